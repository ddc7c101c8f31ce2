"""Train a BSRNN speech enhancer: the recipe entrypoint (config: ``train_bsrnn.yaml``).

Usage:
    python workflows/train_bsrnn.py --config workflows/train_bsrnn.yaml [--set optim.steps=1000 ...]
    torchrun --nproc_per_node 4 workflows/train_bsrnn.py --config workflows/train_bsrnn.yaml
    python workflows/train_bsrnn.py --config workflows/train_bsrnn.yaml --ray-workers 8 --gpu

Under ``torchrun`` every process runs this script and :func:`kimia_model.bsrnn_train.train`
joins the process group from the environment; with ``--ray-workers`` Ray Train starts the
workers (on the cluster in ``RAY_ADDRESS`` or a local one). The output directory's ``best``
checkpoint is what ``enhance.model`` points at.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: make the project importable
    sys.path.insert(0, str(ROOT))

from kimia_model.bsrnn_train import TrainConfig, train, train_with_ray  # noqa: E402


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as YAML (numbers, lists...)."""
    if "=" not in assignment:
        raise SystemExit(f"--set {assignment}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise SystemExit(f"--set {assignment}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read the recipe YAML, apply ``--set`` overrides, validate into :class:`TrainConfig`."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: top level must be a mapping")
    for o in overrides or []:
        apply_override(data, o)
    return TrainConfig.model_validate(data)


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).with_suffix(".yaml")), help="recipe YAML")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable)")
    ap.add_argument("--ray-workers", type=int, default=0, help="train on N Ray Train workers (0 = no Ray)")
    ap.add_argument("--gpu", action="store_true", help="with --ray-workers: one GPU per worker")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        print(f"invalid config {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.ray_workers > 0:
        result = train_with_ray(cfg, args.ray_workers, args.gpu)
        print(f"done: {result['metrics']} -> {cfg.out_dir}")
    else:
        try:
            hist = train(cfg)
        except (ValueError, FileNotFoundError) as exc:  # bad corpora paths, resume mismatch
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if hist["rank"] != 0:  # under torchrun only rank 0 validates and reports
            return 0
        best = max((m["si_sdr"] for _, m in hist["valid"]), default=float("nan"))
        print(f"done at step {hist['step']}: best validation SI-SDR {best:.2f} dB -> {cfg.out_dir}/best")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
