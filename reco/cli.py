"""`reco <stage> CONFIG.yaml [dotted.key=value ...]`, `reco run CONFIG.yaml`, `reco serve CONFIG.yaml`,
`reco demo`.

A thin layer over the stage functions: each takes the typed config, so notebooks,
tests and `ray job submit -- reco ...` all run the same code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Callable

from reco.config import RecoConfig, load_config
from reco.errors import RecoError
from reco.malloc import keep_freed_memory

# Stage name -> "module:function", in pipeline order. Imported lazily: `reco --help` stays fast.
STAGES: dict[str, tuple[str, str]] = {
    "download": ("pipeline.download:download", "download a URL list's images into webdataset corpus shards"),
    "embed": ("pipeline.embed:embed", "embed corpus shards into the Parquet memory"),
    "index": ("indexing.build:build_index", "build or update the sharded faiss indices of the memory"),
    "neighbors": ("indexing.neighbors:neighbors", "precompute each training pair's k neighbours per modality"),
    "train": ("training.train:train", "train the fusion modules (RECO loss) on Ray Train"),
    "evaluate": ("evaluation.evaluate:evaluate", "zero-shot classification and retrieval, frozen CLIP vs RECO"),
}


def stage_function(name: str) -> Callable[[RecoConfig], object]:
    module, func = STAGES[name][0].split(":")
    return getattr(importlib.import_module(module), func)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reco", description="RECO: retrieval-enhanced CLIP on Ray. Stages run in order: "
        + " -> ".join(STAGES) + ".")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's own logs (hidden otherwise)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. embed.batch_size=64")
    p = sub.add_parser("run", help="run every stage in order, skipping those whose output is up to date")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--dry-run", action="store_true", help="list what would run and why; run nothing")
    p = sub.add_parser("serve", help="serve the trained model's embeddings over HTTP (Ray Serve) until Ctrl-C")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. serve.port=8001")
    p = sub.add_parser("demo", help="the whole pipeline, offline, on a small synthetic corpus")
    p.add_argument("--workdir", default="reco-demo", help="where the demo writes (default ./reco-demo)")
    p.add_argument("--quick", action="store_true", help="a smaller world: a smoke run of a few minutes")
    return parser


OUR_PACKAGES = ("reco", "pipeline", "indexing", "training", "evaluation")


def _setup_logging(verbose: bool) -> None:
    """Our progress at INFO; Ray's internals only with -v (reco.cluster.quiet_ray_logging)."""
    from reco.cluster import VERBOSE_ENV, quiet_ray_logging

    # The root logger stays at WARNING: libraries that log to it (open_clip's model-creation
    # INFO lines) would otherwise fill the console; our own packages log at INFO.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in OUR_PACKAGES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # inherited by the local Ray's workers too
    quiet_ray_logging()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    keep_freed_memory()  # the driver runs torch too: the demo's pre-training, evaluation's scoring
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        if args.command == "demo":
            from reco.demo.run import run_demo
            run_demo(args.workdir, quick=args.quick)
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "serve":
            from reco.serve import serve_forever
            return serve_forever(cfg)
        if args.command == "run":
            from reco.run import run_pipeline
            run_pipeline(cfg, dry_run=args.dry_run)
        else:
            stage_function(args.command)(cfg)
        return 0
    except RecoError as err:
        print(f"reco: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reco: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
