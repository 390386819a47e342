"""The ``clipgs`` command. ``main(argv)`` takes an argument list, so tests run the real entry
points. Every expected failure is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from clipgs.errors import ClipgsError

from clipgs.tracking import DEFAULT_TRACKING, tracking_uri


def _tracking(args) -> str:
    return tracking_uri(args.tracking_uri)


def cmd_inspect(args) -> int:
    from clipgs.data.formats import load_gaussians, summarize

    bad = 0
    for path in args.files:  # a bad file is reported, the rest are still inspected
        try:
            summary = summarize(load_gaussians(path))
        except ClipgsError as exc:
            print(f"clipgs inspect: error: {exc}", file=sys.stderr)
            bad += 1
            continue
        print(json.dumps({"file": path, **summary}))
    return 2 if bad else 0


def cmd_render(args) -> int:
    from clipgs.data.formats import load_gaussians
    from clipgs.data.axes import UP_AXES, format_up, parse_up
    from clipgs.data.sources import sidecar_up
    from clipgs.data.views import render, ring_cameras, to_png

    if args.views < 1 or not 0 <= args.view < args.views:
        raise ClipgsError(f"--view {args.view} of --views {args.views}: expected --views >= 1 "
                          "and 0 <= --view < --views")
    if not 8 <= args.size <= 4096:
        raise ClipgsError(f"--size {args.size}: expected 8..4096 pixels")
    up, why = (None, None) if args.up == "auto" else (parse_up(args.up), "--up")
    if why and up is None:
        raise ClipgsError(f"--up {args.up}: expected auto or one of {', '.join(UP_AXES)}")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ClipgsError(f"--out {args.out}: no folder {out.parent}")
    points = load_gaussians(args.file).activated()
    if up is None:  # auto: as ingest renders it, the sidecar's axis, else the format's
        up, why = sidecar_up(args.file)
    if up is None:
        up, why = format_up(args.file), "its format"
    image = (render(points, ring_cameras(args.views, up=up)[args.view], args.size) * 255).byte()
    png = to_png(image.numpy())
    if out.is_symlink() or (out.exists() and not out.is_file()):  # through a link, to a device
        with open(out, "wb") as f:
            f.write(png)
    else:
        from clipgs.data.storage import write_bytes

        write_bytes(str(out), png)  # whole or not at all
    print(f"wrote {args.out} (up {up}, from {why})")
    return 0


def cmd_ingest(args) -> int:
    from clipgs.config import IngestConfig, load_config
    from clipgs.data.ingest import ingest

    config = load_config(IngestConfig, args.config, args.overrides)
    result = ingest(args.source, args.output, config)
    m = result.manifest
    print(json.dumps({"output": args.output, "train": m["splits"]["train"]["count"],
                      "test": m["splits"]["test"]["count"], "rejected": m["rejected"],
                      "shards_written": result.written_shards,
                      "shards_skipped": result.skipped_shards}))
    for r in result.rejects:
        print(f"rejected {r['source']}: {r['error']}", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from clipgs.train.launch import train

    overrides = list(args.overrides)
    if args.tracking_uri:
        overrides.append(f"tracking.tracking_uri={args.tracking_uri}")
    print(json.dumps(train(args.config, overrides, args.nproc)))
    return 0


def cmd_evaluate(args) -> int:
    from clipgs.config import EvalConfig, load_config
    from clipgs.eval.evaluate import check_run, evaluate, log_to_mlflow

    config = load_config(EvalConfig, args.config, args.overrides)
    if args.model.startswith(("models:/", "runs:/")) or args.run_id:
        import mlflow

        mlflow.set_tracking_uri(_tracking(args))
    if args.run_id:
        check_run(args.run_id, _tracking(args))
    result = evaluate(args.model, args.data, config)
    out = {"metrics": result["metrics"], "per_class_accuracy": result["per_class"]}
    if args.run_id or args.log:
        out["mlflow_run_id"] = log_to_mlflow(result, args.run_id, _tracking(args),
                                             experiment=args.experiment)
    print(json.dumps(out))
    return 0


def cmd_register(args) -> int:
    from clipgs.registry.registry import log_package_run, register
    from clipgs.registry.serving import ServingLimits

    if bool(args.run_id) == bool(args.package):
        raise ClipgsError("register: give exactly one of --run-id or --package")
    run_id = args.run_id or log_package_run(args.package, _tracking(args))
    limits = ServingLimits(**{k: v for k, v in (
        ("max_rows", args.max_rows), ("max_file_bytes", args.max_file_bytes),
        ("max_gaussians", args.max_gaussians)) if v is not None})
    version = register(run_id, _tracking(args), args.name, limits)
    print(json.dumps({"name": args.name, "version": version, "alias": "challenger",
                      "run_id": run_id}))
    return 0


def cmd_promote(args) -> int:
    from clipgs.config import EvalConfig, PromoteConfig, load_config, validate
    from clipgs.registry.registry import promote, rollback

    if args.rollback:
        print(json.dumps(rollback(args.name, _tracking(args))))
        return 0
    if not args.data:
        raise ClipgsError("promote: --data SHARDS is required (or --rollback)")
    gate = {"metric": args.metric, "margin": args.margin}
    if args.guard is not None:
        gate["guard_metrics"] = [g for g in args.guard if g]
    if args.tolerance is not None:
        gate["guard_tolerance"] = args.tolerance
    if args.allow_rolled_back:
        gate["allow_rolled_back"] = True
    gate_config = validate(PromoteConfig, gate, "promote gate (--metric, --margin, --guard, "
                           "--tolerance): ")
    decision = promote(args.name, args.data, _tracking(args), gate_config,
                       args.version, load_config(EvalConfig, args.config, args.overrides))
    print(decision["reason"], file=sys.stderr)
    print(json.dumps(decision))
    return 0


def cmd_embed(args) -> int:
    import numpy as np

    if args.model.startswith(("models:/", "runs:/")):
        import mlflow

        mlflow.set_tracking_uri(_tracking(args))
    from clipgs.embed import embed_files, embed_texts

    if not args.files and not args.text:
        raise ClipgsError("embed: give 3DGS files and/or --text CAPTION")
    parts, names = [], []
    if args.files:
        parts.append(embed_files(args.files, args.model))
        names += [("file", f) for f in args.files]
    if args.text:
        parts.append(embed_texts(args.text, args.model))
        names += [("text", t) for t in args.text]
    emb = np.concatenate(parts)
    if args.out:
        np.save(args.out, emb)
    for (kind, name), e in zip(names, emb):
        print(json.dumps({kind: name, "dim": len(e), "embedding": [round(float(v), 5) for v in e]
                          if args.full else [round(float(v), 4) for v in e[:6]] + ["..."]}))
    return 0


def cmd_pipeline(args) -> int:
    # the ephemeral server's telemetry heartbeat phones home and races other processes on
    # the shared sqlite DB; nothing here needs it
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        from flows.pipeline import retrain_pipeline
    except ImportError as exc:
        raise ClipgsError(f"`clipgs pipeline` needs the flows package and Prefect ({exc})")
    overrides = list(args.overrides)
    if args.source:
        overrides.append(f"source={args.source}")
    if args.workdir:
        overrides.append(f"workdir={args.workdir}")
    summary = retrain_pipeline(config_path=args.config, overrides=overrides,
                               tracking_uri=_tracking(args))
    print(json.dumps(summary, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("clipgs", description="CLIP-GS: 3DGS objects embedded in "
                                "CLIP space, from ingestion to a served model.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help_text, tracking=False, overrides=False, positionals=()):
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.set_defaults(fn=fn)
        for name_, help_ in positionals:  # before the overrides, which take the rest
            s.add_argument(name_, help=help_)
        if tracking:
            s.add_argument("--tracking-uri", help=f"MLflow (default $MLFLOW_TRACKING_URI or "
                           f"{DEFAULT_TRACKING})")
        if overrides:
            s.add_argument("--config", help="YAML config file")
            s.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        return s

    s = add("inspect", cmd_inspect, "read and validate 3DGS files, print a summary of each")
    s.add_argument("files", nargs="+")
    s = add("render", cmd_render, "render one view of a 3DGS file to a PNG")
    s.add_argument("file")
    s.add_argument("--out", required=True)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--views", type=int, default=4)
    s.add_argument("--view", type=int, default=0)
    s.add_argument("--up", default="auto", help="the object's up axis: +x, -x, +y, -y, +z, -z "
                   "(auto: as ingest takes it, the sidecar's \"up\", else the format's: +y "
                   "for glTF, .spz and OBJ, -y for .splat, +z for the rest); write --up=-y, "
                   "as argparse takes a bare -y for an option")
    s = add("ingest", cmd_ingest, "assets (folder or s3://) to webdataset shards + manifest",
            overrides=True, positionals=(("source", "assets: a folder, file or s3:// prefix"),
                                         ("output", "shards: a folder or s3:// prefix")))
    s = add("train", cmd_train, "one DeepSpeed training run (spawns --nproc local ranks)",
            tracking=True, overrides=True)
    s.add_argument("--nproc", type=int)
    s = add("evaluate", cmd_evaluate, "zero-shot (prompt ensemble, per class), retrieval R@K "
            "in four directions and the few-shot linear probe of a model on shards; --log "
            "adds the plots to MLflow", tracking=True, overrides=True)
    s.add_argument("--model", required=True, help="model folder, runs:/ or models:/ URI")
    s.add_argument("--data", required=True, help="shard set (folder or s3://)")
    s.add_argument("--run-id", help="log the metrics to this MLflow run")
    s.add_argument("--log", action="store_true", help="log to a new MLflow run")
    s.add_argument("--experiment", default="clipgs", help="the new run's MLflow experiment")
    s = add("register", cmd_register, "register a training run's model (or a package folder) "
            "as an MLflow pyfunc, alias challenger", tracking=True)
    s.add_argument("--run-id", help="a `clipgs train` run (its 'package' artifact)")
    s.add_argument("--package", help="a model package folder, logged as a new run first")
    s.add_argument("--name", default="clipgs")
    s.add_argument("--max-rows", type=int, help="serving limit: rows per request")
    s.add_argument("--max-file-bytes", type=int, help="serving limit: bytes of one file")
    s.add_argument("--max-gaussians", type=int, help="serving limit: gaussians per object")
    s = add("promote", cmd_promote, "move champion to the challenger if it beats the champion "
            "on the gate metric by --margin (and holds the guards); --rollback moves it back",
            tracking=True, overrides=True)
    s.add_argument("--name", default="clipgs")
    s.add_argument("--data", help="shard set both models are evaluated on")
    s.add_argument("--version", help="default: the challenger alias")
    s.add_argument("--metric", default="zeroshot_top1", help="the gate metric")
    s.add_argument("--margin", type=float, default=0.0)
    s.add_argument("--guard", action="append", help="guard metric (repeat; '' for none; "
                   "default: the config's guard_metrics)")
    s.add_argument("--tolerance", type=float, help="how much a guard metric may drop")
    s.add_argument("--rollback", action="store_true",
                   help="put champion back on the version the current champion replaced")
    s.add_argument("--allow-rolled-back", action="store_true",
                   help="promote a version --rollback took down (refused otherwise)")
    s = add("embed", cmd_embed, "embeddings of 3DGS files and captions with a model",
            tracking=True)
    s.add_argument("files", nargs="*")
    s.add_argument("--text", action="append", help="a caption to embed (repeat)")
    s.add_argument("--model", default="models:/clipgs@champion")
    s.add_argument("--out", help="save the embeddings as .npy")
    s.add_argument("--full", action="store_true", help="print every dimension")
    s = add("pipeline", cmd_pipeline, "ingest -> train -> evaluate -> register/promote as one "
            "Prefect flow", tracking=True, overrides=True)
    s.add_argument("--source", help="assets (folder or s3://); default: generated primitives")
    s.add_argument("--workdir", help="where shards and checkpoints go (default ./work)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "alembic", "urllib3"):  # request-by-request chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except ClipgsError as exc:
        print(f"clipgs {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
