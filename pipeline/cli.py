"""Command line: ``kimia-curate`` (also ``python -m pipeline``).

Exit codes: 0 success, 1 a verification found problems, 2 the command could not run
(bad config, missing model, bad input argument): the message says what to fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "configs/local.yaml"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help=f"YAML profile (default: {DEFAULT_CONFIG} if present)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config value; repeatable (e.g. --set transcribe.beam_size=1)",
    )


def _load(args: argparse.Namespace) -> tuple[Any, str]:
    from pipeline.config import load_config

    path = args.config
    if path is None:
        path = DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None
    return load_config(path, args.overrides), str(path or "<defaults>")


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.run import format_summary, run

    cfg, path = _load(args)
    summary = run(
        cfg, args.input, args.output, address=args.address, config_path=path, progress=not args.quiet,
        retry_quarantined=args.retry_quarantined, allow_config_change=args.allow_config_change,
        verbose=args.verbose,
    )
    print(format_summary(summary))
    print(f"output: {Path(args.output).resolve()}")
    return EXIT_FAILED if summary.get("failed") else 0


#: ``run`` exit codes: 0 every input committed (kept, dropped, empty or quarantined as bad
#: input); 2 a usage or config error, nothing done; 3 some inputs failed for another reason
#: (transient failures after their retries, or lost by the graph): see the summary's
#: ``failed`` list and re-run with ``--retry-quarantined``.
EXIT_FAILED = 3


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.inspect_output import inspect_output

    report = inspect_output(Path(args.output), decode_audio=not args.no_decode)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.output}: {report['shards']} shards, {report['samples']} samples, "
              f"{report.get('recordings', 0)} recordings, {report.get('hours', 0):.4f} h")
        for f in report["findings"]:
            print(f"FAIL {f}")
        print("OK: shards, index and manifest agree" if report["ok"] else f"{len(report['findings'])} finding(s)")
    return 0 if report["ok"] else 1


def cmd_models(args: argparse.Namespace) -> int:
    from pipeline.models import list_models

    cfg, _ = _load(args)
    rows = list_models(cfg, verify=args.action == "verify")
    width = max((len(r["key"]) for r in rows), default=10)
    bad = 0
    for r in rows:
        status = r["status"]
        bad += status not in ("present", "intact")
        print(f"{r['key']:<{width}}  {r['ref']:<28}  {status:<8}  {r['detail']}")
    return 1 if (bad and args.action == "verify") else 0


def cmd_audit(args: argparse.Namespace) -> int:
    from stages.audit.cli import main as audit_main

    return audit_main(args.rest)


def cmd_eval_diarization(args: argparse.Namespace) -> int:
    from stages.diarize import eval_diarization

    cfg, _ = _load(args)
    section = cfg.diarize.model_copy(update={"enabled": True})
    out = Path(args.output)
    result = eval_diarization(Path(args.reference), Path(args.input), section, out, collar=args.collar)
    print(json.dumps(result.get("total", result), indent=2, default=str))
    print(f"RTTM and metrics.json in {out}")
    return 0


def cmd_tokenizer_fit(args: argparse.Namespace) -> int:
    from kimia_model.codebook import fit_codebook

    cfg, _ = _load(args)
    cache = Path(cfg.models.cache_dir).expanduser()
    out = Path(args.out)
    if out.suffix != ".safetensors" and "/" not in args.out:
        out = cache / "codebooks" / f"{args.out}.safetensors"  # a bare name, as tokenize.codebook takes it
    report = fit_codebook(
        [Path(p) for p in args.inputs], out, args.model or cfg.tokenize.model, args.size,
        pool_layer=args.layer, max_hours=args.max_hours, iterations=args.iterations, seed=args.seed, cache_dir=cache,
    )
    print(json.dumps(report, indent=2, default=str))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from stages.export_kimi import export_kimi_audio

    report = export_kimi_audio(Path(args.run), Path(args.dest), task=args.task)
    print(json.dumps(report, indent=2, default=str))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.synth import run_synth

    cfg, _ = _load(args)
    if args.backend:
        cfg.roundtrip.tts_backend = args.backend
    summary = run_synth(cfg, Path(args.texts), Path(args.output), args.voices.split(","),
                        threshold=args.max_wer, per_text=args.per_text, progress=not args.quiet)
    s = summary["synth"]
    print(f"{s['lines']} lines, {s['attempted']} utterances spoken, {s['kept']} kept; dropped: {json.dumps(s['dropped'])}")
    for e in s["errors"][:5]:
        print(f"  {e}")
    print(f"output: {Path(args.output).resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kimia-curate",
        description="Raw speech in, verified training shards out (decode, segment, transcribe, tokenize, write).",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the pipeline")
    _add_config_args(p)
    p.add_argument("--input", "-i", required=True, help="folder (recursive), glob, .jsonl manifest or file")
    p.add_argument("--output", "-o", required=True, help="output directory (re-run to resume)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else embedded Ray)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument(
        "--retry-quarantined", action="store_true",
        help="process again the inputs quarantined by earlier runs into this OUT (their new outcome replaces the old)",
    )
    p.add_argument(
        "--allow-config-change", action="store_true",
        help="resume into an OUT started with a config that changes outputs (samples of both configs then mix)",
    )
    p.epilog = (
        "exit codes: 0 every input committed or quarantined as bad input; 2 usage or config error; "
        "3 some inputs failed for another reason (see the summary; re-run with --retry-quarantined)"
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="verify shards against index and manifest")
    p.add_argument("output")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-decode", action="store_true", help="skip decoding audio (faster)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "audit", help="quality report (OUT/audit/report.html, audit.json); --against BASE compares runs",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="OUT [--against BASE] [--workers N] [--worst-k K] [--address A]")
    p.set_defaults(func=cmd_audit)

    ev = sub.add_parser("eval", help="evaluate a stage against references").add_subparsers(dest="what", required=True)
    p = ev.add_parser("diarization", help="DER (miss, false alarm, confusion) and JER against RTTM references")
    _add_config_args(p)
    p.add_argument("--reference", required=True, help="folder of <stem>.rttm files (or one .rttm)")
    p.add_argument("--input", required=True, help="audio file or folder; stems match the RTTM files")
    p.add_argument("--output", default="diarization-eval", help="where RTTM and metrics.json go")
    p.add_argument("--collar", type=float, default=0.25, help="forgiveness collar around reference boundaries (s)")
    p.set_defaults(func=cmd_eval_diarization)

    tok = sub.add_parser("tokenizer", help="semantic tokenizer tools").add_subparsers(dest="what", required=True)
    p = tok.add_parser("fit", help="fit a VQ codebook on pooled Whisper features of your audio")
    _add_config_args(p)
    p.add_argument("inputs", nargs="+", help="audio files or folders")
    p.add_argument("--out", required=True, help="codebook .safetensors path, or a bare name saved as <cache>/codebooks/NAME.safetensors")
    p.add_argument("--model", default=None, help="Whisper checkpoint (default: tokenize.model)")
    p.add_argument("--size", type=int, default=1024, help="number of codes")
    p.add_argument("--layer", type=int, default=None, help="encoder layer to pool (default: last)")
    p.add_argument("--max-hours", type=float, default=10.0, help="audio sample size")
    p.add_argument("--iterations", type=int, default=100, help="mini-batch k-means iterations")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tokenizer_fit)

    exp = sub.add_parser("export", help="export a run for training code").add_subparsers(dest="what", required=True)
    p = exp.add_parser("kimi-audio", help="JSONL for Kimi-Audio fine-tuning (audio tokens shifted by 152064)")
    p.add_argument("run", help="output directory of a run")
    p.add_argument("dest", help="export directory (data.jsonl + audio/)")
    p.add_argument("--task", default="asr", choices=["asr"], help="fine-tuning task")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("synth", help="speech from text, kept when the round-trip check passes, written as shards")
    _add_config_args(p)
    p.add_argument("--texts", required=True, help='JSONL: {"text": ..., "id"?, "language"?, "voice"?} per line')
    p.add_argument("--output", "-o", required=True, help="output directory (same layout as run)")
    p.add_argument("--voices", default="en-us,en+f3,en+m7,en-gb+f2", help="comma-separated voices, used in turn")
    p.add_argument("--per-text", choices=["cycle", "each"], default="cycle", help="one voice per text, or every voice")
    p.add_argument("--backend", choices=["espeak-ng", "kimia"], default=None, help="TTS (default: roundtrip.tts_backend)")
    p.add_argument("--max-wer", type=float, default=None, help="keep utterances with WER <= this (default: roundtrip.max_wer)")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("models", help="which weights the enabled stages need, and whether they are here")
    p.add_argument("action", choices=["list", "verify"])
    _add_config_args(p)
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from kimia_model.refs import ModelNotFoundError
    from pipeline.config import ConfigError
    from pipeline.inputs import InputError
    from pipeline.outlock import ConfigChangedError, OutputLockedError
    from pipeline.run import PreflightError

    try:
        return int(args.func(args))
    except (ConfigError, ModelNotFoundError, InputError, PreflightError, OutputLockedError, ConfigChangedError) as exc:
        print(f"kimia-curate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kimia-curate: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
