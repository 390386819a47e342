#!/usr/bin/env bash
# Sets up .venv with everything clipgs needs; re-running is a no-op unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.clipgs-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
# checkov (the chart's security scan in tests/test_chart.py) pins boto3, packaging and
# cachetools older than prefect/mlflow accept, so it lives in a venv of its own
if [ ! -x .venv-checkov/bin/checkov ]; then
  "$PY" -m venv .venv-checkov
  .venv-checkov/bin/python -m pip install -q 'checkov>=3.2,<4'
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, from the wheels on local disk (a CUDA build that also runs on CPU); any other
# release would download gigabytes
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
