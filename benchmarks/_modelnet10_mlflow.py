"""The ModelNet10 benchmark's MLflow run: the flags as params, the training curve live (loss,
text and image terms, logit scale, learning rate, epochs - through the platform's bounded
buffer, so a tracking outage never stalls training), then the final figures as metrics (the
EMA weights' under ``ema.``, per-class zero-shot accuracy under ``class_acc.``), the confusion
matrix and curves as images, the result JSON and the weights as artifacts.

The run is opened first, before the cache, so a tracking URI MLflow cannot use is a one-line
error in seconds, not after minutes of work (runs started side by side on a new sqlite file
set it up one at a time: clipgs.tracking.setup_mlflow); a failure while closing it is a
warning - the result JSON and weights on disk are already written - and the run is marked
FAILED rather than left looking complete.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from benchmarks._modelnet10_cache import log
from clipgs.data.sources import MODELNET10_CLASSES
from clipgs.eval.metrics import per_class_accuracy
from clipgs.tracking import tracking_uri as platform_tracking_uri

CURVE = ("loss", "loss_text", "loss_image", "scale", "lr", "epochs")


def tracking_uri(flag: str | None) -> str | None:
    """--mlflow: a URI, 'none' (no tracking), or unset: the platform's default
    (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working folder)."""
    if flag and flag.lower() == "none":
        return None
    return platform_tracking_uri(flag)


def flat_metrics(res: dict, prefix: str = "") -> dict[str, float]:
    """The result's numbers (nested dicts as ``prefix.key``), per-class zero-shot accuracy
    from its confusion matrix; lists, strings and non-finite values left out."""
    out: dict[str, float] = {}
    for k, v in res.items():
        if isinstance(v, dict) and k not in ("argv", "last_log"):
            out.update(flat_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[prefix + k] = float(v)
    if "confusion" in res:
        per_class = per_class_accuracy(np.asarray(res["confusion"]), list(MODELNET10_CLASSES))
        out.update({f"{prefix}class_acc.{name}": acc for name, acc in per_class.items()})
    return out


def curves_figure(history: list[dict]):
    """Training loss (total, text, image) and the logit scale and learning rate by step."""
    from clipgs.eval.plots import _plt

    plt = _plt()
    rows = [r for r in history if "loss" in r]
    steps = [r["step"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.4))
    for key in ("loss", "loss_text", "loss_image"):
        ax.plot(steps, [r[key] for r in rows], label=key)
    ax.set_xlabel("step")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    bx.plot(steps, [r["scale"] for r in rows], color="tab:purple")
    bx.set_xlabel("step")
    bx.set_ylabel("logit scale", color="tab:purple")
    lx = bx.twinx()
    lx.plot(steps, [r["lr"] for r in rows], color="tab:gray")
    lx.set_ylabel("learning rate", color="tab:gray")
    bx.set_title("logit scale and learning rate")
    fig.tight_layout()
    return fig


def open_run(uri: str | None, experiment: str, name: str | None, args, mode: str):
    """The run, or None when tracking is off; a tracking URI MLflow cannot use is a one-line
    error before any work is done."""
    if uri is None:
        return None
    try:
        return BenchmarkRun(uri, experiment, name, args, mode)
    except Exception as exc:  # noqa: BLE001 - any store error: say which URI, stop
        raise SystemExit(
            f"--mlflow {uri}: cannot open an MLflow run there ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:300]}); pass another URI, or --mlflow "
            "none") from exc


class BenchmarkRun:
    """One benchmark invocation as one MLflow run (experiment ``--experiment``)."""

    def __init__(self, uri: str, experiment: str, name: str | None, args, mode: str):
        from clipgs.tracking import BufferedMetrics, git_commit, setup_mlflow

        from mlflow import MlflowClient

        self.mlflow = mlflow = setup_mlflow(uri, experiment)
        self.client = MlflowClient(uri)
        self.run_id = mlflow.start_run(run_name=name).info.run_id
        try:
            # not the tracking URI itself: it is where the run is, and may carry credentials
            mlflow.log_params({k: str(v)[:500] for k, v in sorted(vars(args).items())
                               if k != "mlflow"})
            mlflow.set_tags({"clipgs.stage": "benchmark", "clipgs.benchmark": "modelnet10",
                             "clipgs.benchmark_mode": mode, "clipgs.git_commit": git_commit()})
            self.metrics = BufferedMetrics(self.run_id, uri)
        except BaseException:  # started, then refused or interrupted: not left RUNNING
            self._terminate("FAILED")
            raise
        self.uri = uri
        log(f"MLflow: run {self.run_id} in experiment {experiment!r} at {uri}")

    def name(self, name: str, precision: str) -> None:
        """A training run's name (its result file's) and precision, known after the probe."""
        self.client.update_run(self.run_id, name=name)
        self.mlflow.log_param("precision_chosen", precision)
        log(f"MLflow: run {self.run_id} is {name}")

    def progress(self, row: dict) -> None:
        self.metrics.log({k: row[k] for k in CURVE if k in row}, row["step"])

    def finish(self, results: dict[str, dict], artifacts: list[Path],
               history: list[dict] | None = None, extra: dict[str, float] | None = None) -> None:
        """``results``: metric prefix -> one encoder's result ('' for a training run's)."""
        import matplotlib.pyplot as plt

        from clipgs.eval.plots import confusion_figure

        mlflow = self.mlflow
        try:
            self.metrics.close(60)
            metrics = dict(extra or {})
            for prefix, res in results.items():
                metrics.update(flat_metrics(res, prefix))
            mlflow.log_metrics(metrics)
            figures = {f"plots/{prefix}confusion_matrix.png": confusion_figure(
                np.asarray(res["confusion"]), list(MODELNET10_CLASSES))
                for prefix, res in results.items() if "confusion" in res}
            if history and any("loss" in r for r in history):
                figures["plots/training_curves.png"] = curves_figure(history)
            for path, fig in figures.items():
                mlflow.log_figure(fig, path)
                plt.close(fig)
            for path in artifacts:
                mlflow.log_artifact(str(path))
            mlflow.end_run("FINISHED")
        except Exception as exc:  # noqa: BLE001 - the results on disk are whole already
            log(f"MLflow: could not finish run {self.run_id} at {self.uri} "
                f"({str(exc).splitlines()[0][:200]}); the result files are complete: "
                + ", ".join(map(str, artifacts)))
            self.fail()

    def fail(self) -> None:
        """Close the run as FAILED (training raised, or the run's own finishing did)."""
        try:
            self.metrics.close(10)
        finally:
            self._terminate("FAILED")

    def _terminate(self, status: str) -> None:
        """Set the status through the client: the fluent end_run forgets the active run
        before it writes the status, so after a failed end_run("FINISHED") it does nothing."""
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as exc:  # noqa: BLE001 - reporting, not masking, the first error
            log(f"MLflow: could not mark run {self.run_id} {status} ({exc})")
        try:
            self.mlflow.end_run(status)  # and clear this process's active run, if still set
        except Exception:  # noqa: BLE001, S110 - the status is written above, or reported
            pass
