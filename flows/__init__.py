"""Prefect flows: orchestration only; the work is done by the ``clipgs`` library."""
