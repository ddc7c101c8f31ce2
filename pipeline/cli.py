"""Command line: ``kimia-curate`` (also ``python -m pipeline``).

Exit codes: 0 success, 1 a verification found problems (``inspect``, ``audit``, ``models
verify``) or ``export`` could write no record, 2 a usage or config error (one line on stderr naming what is wrong and how to fix
it, nothing written, Ray not started), 3 ``run`` finished but some inputs failed for a reason
other than bad input (listed under ``failed`` in the summary).

Every user mistake goes through one path: argparse errors through
:class:`pipeline.usage.OneLineParser`, and the command's own checks raise one of
:func:`_user_errors`, caught once in :func:`main`. Each command checks its paths before it
imports a model or starts Ray, so a mistake costs a fraction of a second.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.usage import (
    OneLineParser,
    UsageError,
    existing_dir,
    existing_file,
    existing_path,
    report,
)

PROG = "kimia-curate"
DEFAULT_CONFIG = "configs/local.yaml"

#: ``run`` exit codes: 0 every input committed (kept, dropped, empty or quarantined as bad
#: input); 2 a usage or config error, nothing done; 3 some inputs failed for another reason
#: (transient failures after their retries, or lost by the graph): see the summary's
#: ``failed`` list and re-run with ``--retry-quarantined``.
EXIT_FAILED = 3

RUN_EPILOG = (
    "exit codes: 0 every input committed or quarantined as bad input; 2 usage or config error "
    "(one line on stderr, nothing written); 3 some inputs failed for another reason "
    "(see 'failed' in the summary and OUT/manifest.json; re-run with --retry-quarantined)"
)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the user can fix this": printed as one line, exit 2.

    Only modules already imported can have raised them, so they are looked up in
    ``sys.modules`` rather than imported here (``inspect`` never pays for ``pipeline.run``).
    """
    names = [
        ("pipeline.usage", "UsageError"),
        ("pipeline.config", "ConfigError"),
        ("pipeline.inputs", "InputError"),
        ("pipeline.run", "PreflightError"),
        ("pipeline.guard", "OutputLockedError"),
        ("pipeline.guard", "ConfigChangedError"),
        ("kimia_model.refs", "ModelNotFoundError"),
        ("stages.diarize.evaluate", "EvalInputError"),
    ]
    found = (getattr(sys.modules[m], n, None) for m, n in names if m in sys.modules)
    return tuple(t for t in found if isinstance(t, type) and issubclass(t, BaseException))


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


def _output_dir(value: str, option: str) -> Path:
    """An output directory argument: may not exist yet, but must not be a file."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {value} is a file: pass a directory (it is created if missing)")
    return path


def _check_input(spec: str) -> None:
    """``run --input``: a path that exists, or a glob that matches something.

    What the path holds (audio files, manifest lines) is checked by discovery, which runs
    before any work; this only catches a mistyped path without loading the pipeline.
    """
    if Path(spec).expanduser().exists():
        return
    if glob.has_magic(spec) and glob.glob(os.path.expanduser(spec), recursive=True):
        return
    raise UsageError(f"--input not found: {spec} (pass a folder, a glob, a .jsonl manifest or an audio file)")


def cmd_run(args: argparse.Namespace) -> int:
    _check_input(args.input)
    _output_dir(args.output, "--output")
    cfg, path = _load(args)
    from pipeline.run import format_summary, run

    summary = run(
        cfg, args.input, args.output, address=args.address, config_path=path, progress=not args.quiet,
        retry_quarantined=args.retry_quarantined, allow_config_change=args.allow_config_change,
        verbose=bool(args.verbose),
    )
    print(format_summary(summary))
    print(f"output: {Path(args.output).resolve()}")
    return EXIT_FAILED if summary.get("failed") else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    out = existing_dir(args.output, "OUT", "pass the --output folder of a run")
    from pipeline.inspect_output import inspect_output

    result = inspect_output(out, decode_audio=not args.no_decode)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.output}: {result['shards']} shards, {result['samples']} samples, "
              f"{result.get('recordings', 0)} recordings, {result.get('hours', 0):.4f} h")
        for f in result["findings"]:
            print(f"FAIL {f}")
        print("OK: shards, index and manifest agree" if result["ok"] else f"{len(result['findings'])} finding(s)")
    return 0 if result["ok"] else 1


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
    from pipeline.audit.cli import run as run_audit

    return run_audit(args)


def cmd_eval_diarization(args: argparse.Namespace) -> int:
    reference = existing_path(args.reference, "--reference", "pass an .rttm file or a folder of <stem>.rttm files")
    if reference.is_dir() and not any(reference.rglob("*.rttm")):
        raise UsageError(f"--reference {args.reference} holds no .rttm files (pass a folder of <stem>.rttm files)")
    inputs = existing_path(args.input, "--input", "pass an audio file or a folder whose stems match the RTTM files")
    out = _output_dir(args.output, "--output")
    if args.collar < 0:
        raise UsageError(f"--collar must be >= 0 (got {args.collar})")
    cfg, _ = _load(args)
    from stages.diarize import eval_diarization

    section = cfg.diarize.model_copy(update={"enabled": True})
    result = eval_diarization(reference, inputs, section, out, collar=args.collar)
    print(json.dumps(result.get("total", result), indent=2, default=str))
    print(f"RTTM and metrics.json in {out}")
    return 0


def _read_labels(path: Path, flag: str) -> tuple[dict[str, str], dict[str, str]]:
    texts: dict[str, str] = {}
    languages: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key = str(item.get("id", item.get("source")))
            texts[key] = str(item["text"])
        except (ValueError, KeyError, AttributeError):
            raise UsageError(f'{flag} {path}:{n}: expected {{"id": ..., "text": ..., "language": ...}} per line') from None
        if item.get("language"):
            languages[key] = str(item["language"])
    return texts, languages


def cmd_eval_transcripts(args: argparse.Namespace) -> int:
    how = 'pass a JSONL file with {"id": ..., "text": ...} per line'
    ref_path = existing_path(args.reference, "--reference", how)
    hyp_path = existing_path(args.hypothesis, "--hypothesis", how)
    from stages.textnorm import score_labels

    refs, languages = _read_labels(ref_path, "--reference")
    hyps, hyp_languages = _read_labels(hyp_path, "--hypothesis")
    result = score_labels(refs, hyps, {**hyp_languages, **languages})
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def cmd_tokenizer_fit(args: argparse.Namespace) -> int:
    inputs = [existing_path(p, "audio input", "pass audio files or folders of them") for p in args.inputs]
    for name, value, low in (("--size", args.size, 2), ("--iterations", args.iterations, 1)):
        if value < low:
            raise UsageError(f"{name} must be >= {low} (got {value})")
    if args.max_hours <= 0:
        raise UsageError(f"--max-hours must be > 0 (got {args.max_hours})")
    cfg, _ = _load(args)
    from kimia_model.codebook import fit_codebook

    cache = Path(cfg.models.cache_dir).expanduser()
    out = Path(args.out)
    if out.suffix != ".safetensors" and "/" not in args.out:
        out = cache / "codebooks" / f"{args.out}.safetensors"  # a bare name, as tokenize.codebook takes it
    result = fit_codebook(
        inputs, out, args.model or cfg.tokenize.model, args.size,
        pool_layer=args.layer, max_hours=args.max_hours, iterations=args.iterations, seed=args.seed, cache_dir=cache,
        padding=args.padding,
    )
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    run_dir = existing_dir(args.run, "OUT", "pass the --output folder of a finished run")
    if not any((run_dir / "shards").glob("*.tar")):
        raise UsageError(f"{args.run} holds no shards (OUT/shards/*.tar): pass the --output folder of a finished run")
    dest = _output_dir(args.dest, "DEST")
    requested = args.tokenizer or _configured_tokenizer(args)
    from pipeline.export.kimi_audio import TokenizerMismatchError, export_kimi_audio

    try:
        result = export_kimi_audio(run_dir, dest, task=args.task, tokenizer=None if requested == "any" else requested)
    except TokenizerMismatchError as exc:
        raise UsageError(str(exc)) from exc
    print(json.dumps(result, indent=2, default=str))
    if not result["written"]:
        # An empty data.jsonl is no training set: fail loudly so scripts and CI notice.
        skipped = ", ".join(f"{k} {v}" for k, v in result["skipped"].items()) or "no samples"
        print(f"{PROG} export: no records written ({skipped})", file=sys.stderr)
        return 1
    return 0


def _configured_tokenizer(args: argparse.Namespace) -> str:
    """The tokenizer id the ``--config`` profile's tokenize section records in provenance.

    Resolving it may install the shipped codebook into the cache, exactly as a run would.
    """
    cfg, _ = _load(args)
    from stages.base import StageContext
    from stages.tokenize import TokenizeStage

    context = StageContext(cache_dir=Path(cfg.models.cache_dir).expanduser())
    return TokenizeStage(cfg.tokenize, context).expected_model_id()


def cmd_synth(args: argparse.Namespace) -> int:
    texts = existing_file(args.texts, "--texts", 'pass a JSONL file with one {"text": ...} per line')
    out = _output_dir(args.output, "--output")
    voices = [v.strip() for v in args.voices.split(",") if v.strip()]
    if not voices:
        raise UsageError("--voices is empty (pass comma-separated voices, e.g. en-us,en+f3)")
    if args.max_wer is not None and args.max_wer < 0:
        raise UsageError(f"--max-wer must be >= 0 (got {args.max_wer})")
    cfg, _ = _load(args)
    from pipeline.synth.workflow import run_synth

    if args.backend:
        cfg.roundtrip.tts_backend = args.backend
    summary = run_synth(cfg, texts, out, voices, threshold=args.max_wer, per_text=args.per_text,
                        progress=not args.quiet)
    s = summary["synth"]
    print(f"{s['lines']} lines, {s['attempted']} utterances spoken, {s['kept']} kept; dropped: {json.dumps(s['dropped'])}")
    for e in s["errors"][:5]:
        print(f"  {e}")
    print(f"output: {out.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Raw speech in, verified training shards out (decode, segment, transcribe, tokenize, write).",
        epilog="exit codes: 0 success; 1 a verification found problems; 2 usage or config error; "
               "3 run: some inputs failed (see run --help)",
    )
    parser.add_argument("--verbose", "-v", action="count", default=0,
                        help="more logging from this program, Ray and libraries (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the pipeline", epilog=RUN_EPILOG)
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
    # SUPPRESS: an absent -v here must not reset a -v given before the subcommand.
    p.add_argument("--verbose", "-v", action="count", default=argparse.SUPPRESS,
                   help="Ray workers and libraries log to the terminal (quiet by default); -vv: debug")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="verify shards against index and manifest")
    p.add_argument("output", metavar="OUT", help="output folder of a run")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-decode", action="store_true", help="skip decoding audio (faster)")
    p.set_defaults(func=cmd_inspect)

    from pipeline.audit.cli import DESCRIPTION as AUDIT_DESCRIPTION
    from pipeline.audit.cli import add_arguments as add_audit_arguments

    p = sub.add_parser(
        "audit", help="quality report (OUT/audit/report.html, audit.json); --against BASE compares runs",
        description=AUDIT_DESCRIPTION,
    )
    add_audit_arguments(p)
    p.set_defaults(func=cmd_audit)

    ev = sub.add_parser("eval", help="evaluate a stage against references")
    ev_sub = ev.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = ev_sub.add_parser("diarization", help="DER (miss, false alarm, confusion) and JER against RTTM references")
    _add_config_args(p)
    p.add_argument("--reference", required=True, help="folder of <stem>.rttm files (or one .rttm)")
    p.add_argument("--input", required=True, help="audio file or folder; stems match the RTTM files")
    p.add_argument("--output", default="diarization-eval", help="where RTTM and metrics.json go")
    p.add_argument("--collar", type=float, default=0.25, help="forgiveness collar around reference boundaries (s)")
    p.set_defaults(func=cmd_eval_diarization)
    p = ev_sub.add_parser("transcripts", help="WER and CER of labels against reference transcripts "
                          "(CER decides for zh, ja, ko)")
    p.add_argument("--reference", required=True, help='JSONL: {"id": ..., "text": ..., "language": ...} per line')
    p.add_argument("--hypothesis", required=True, help="JSONL in the same form: the labels to score")
    p.set_defaults(func=cmd_eval_transcripts)

    tok = sub.add_parser("tokenizer", help="semantic tokenizer tools")
    tok_sub = tok.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = tok_sub.add_parser("fit", help="fit a VQ codebook on pooled Whisper features of your audio")
    _add_config_args(p)
    p.add_argument("inputs", nargs="+", help="audio files or folders")
    p.add_argument("--out", required=True, help="codebook .safetensors path, or a bare name saved as <cache>/codebooks/NAME.safetensors")
    p.add_argument("--model", default=None, help="Whisper checkpoint (default: tokenize.model)")
    p.add_argument("--size", type=int, default=1024, help="number of codes")
    p.add_argument("--layer", type=int, default=None, help="encoder layer to pool (default: last)")
    p.add_argument("--max-hours", type=float, default=10.0, help="audio sample size")
    p.add_argument("--iterations", type=int, default=100, help="mini-batch k-means iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--padding", choices=("multiple", "full"), default="multiple",
        help="how windows are padded, recorded in the codebook so tokenize pads the same way: multiple = each "
        "segment encoded at its own length (fast, the default), full = zeros to 30 s (Whisper's training input)",
    )
    p.set_defaults(func=cmd_tokenizer_fit)

    exp = sub.add_parser("export", help="export a run for training code")
    exp_sub = exp.add_subparsers(dest="what", required=True, metavar="FORMAT")
    p = exp_sub.add_parser(
        "kimi-audio", help="JSONL for Kimi-Audio fine-tuning (audio tokens shifted by 152064)",
        epilog="exit codes: 0 records written; 1 no record could be written; 2 usage error, or the run's tokens "
               "come from another tokenizer than the one requested (nothing written)",
    )
    p.add_argument("run", metavar="OUT", help="output directory of a run")
    p.add_argument("dest", metavar="DEST", help="export directory (data.jsonl + audio/)")
    p.add_argument("--task", default="asr", choices=["asr"], help="fine-tuning task")
    p.add_argument(
        "--tokenizer", default=None, metavar="ID",
        help="tokenizer the training expects, as in the samples' provenance (MODEL+codebook:NAME@SHA8); "
             "default: the --config profile's tokenize section; 'any' skips the check",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("synth", help="speech from text, kept when the round-trip check passes, written as shards")
    _add_config_args(p)
    p.add_argument("--texts", required=True, help='JSONL: {"text": ..., "id"?, "language"?, "voice"?} per line')
    p.add_argument("--output", "-o", required=True, help="output directory (same layout as run)")
    p.add_argument("--voices", default="en-us,en+f3,en+m7,en-gb+f2", help="comma-separated voices, used in turn")
    p.add_argument("--per-text", choices=["cycle", "each"], default="cycle", help="one voice per text, or every voice")
    p.add_argument("--backend", choices=["espeak-ng", "kimia"], default=None, help="TTS (default: roundtrip.tts_backend)")
    p.add_argument("--max-wer", type=float, default=None, help="keep utterances with WER (CER for zh, ja, ko) <= this (default: roundtrip.max_wer)")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("models", help="which weights the enabled stages need, and whether they are here")
    p.add_argument("action", choices=["list", "verify"])
    _add_config_args(p)
    p.set_defaults(func=cmd_models)
    return parser


def _configure_logging(verbosity: int) -> None:
    """Quiet by default (warnings only); ``-v`` shows INFO, ``-vv`` DEBUG."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = build_parser().parse_args(argv)  # a usage mistake exits 2 here, with one line
    _configure_logging(args.verbose)
    prog = " ".join([PROG, args.command, *([args.what] if getattr(args, "what", None) else [])])
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            return report(prog, exc)
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
