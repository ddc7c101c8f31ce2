"""Diarization evaluation: DER (miss, false alarm, confusion) and JER, RTTM read/write.

Scores come from ``pyannote.metrics`` (the reference implementation used by DIHARD-style
benchmarks). The hypothesis scored is the stage's speaker turns *before* segment merging:
segment merging deliberately bridges pauses of up to 2 s inside one speaker's segment, which
is right for training data but would be counted as false alarm; the emitted segments are
scored too (``der_segments``) so that cost stays visible.

CLI (wired by the lead): ``kimia-curate eval diarization --reference RTTM_DIR --input AUDIO``
calls :func:`eval_diarization`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from stages.diarize.postprocess import Turn


class EvalInputError(ValueError):
    """References or audio that cannot be scored (a malformed RTTM line, no audio matching a reference).

    A mistake in what the user passed, phrased as one line: the CLI reports it and exits 2.
    Defined here rather than borrowed from the CLI so that stages never import ``pipeline``.
    """


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus", ".aiff", ".aif")


def read_rttm(path: Path) -> dict[str, list[tuple[float, float, str]]]:
    """Parse an RTTM file into ``{uri: [(start, end, speaker), ...]}`` (SPEAKER lines only).

    Raises:
        EvalInputError: on a malformed SPEAKER line, naming file and line number.
    """
    out: dict[str, list[tuple[float, float, str]]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0] != "SPEAKER":
            continue
        try:
            uri, start, dur, spk = parts[1], float(parts[3]), float(parts[4]), parts[7]
        except (IndexError, ValueError) as exc:
            raise EvalInputError(f"{path}:{n}: malformed RTTM line: {line!r}") from exc
        out.setdefault(uri, []).append((start, start + dur, spk))
    return out


def write_rttm(path: Path, uri: str, turns: Iterable[tuple[float, float, str]]) -> None:
    """Write turns as RTTM ``SPEAKER`` lines (3 decimals, as NIST tools print them)."""
    lines = [
        f"SPEAKER {uri} 1 {s:.3f} {e - s:.3f} <NA> <NA> {spk} <NA> <NA>"
        for s, e, spk in sorted(turns)
        if e > s
    ]
    Path(path).write_text("\n".join(lines) + ("\n" if lines else ""))


def to_annotation(turns: Iterable[tuple[float, float, str]], uri: str = "x") -> Any:
    """pyannote.core Annotation from ``(start, end, speaker)`` triples."""
    from pyannote.core import Annotation, Segment

    ann = Annotation(uri=uri)
    for i, (s, e, spk) in enumerate(turns):
        if e > s:
            ann[Segment(s, e), i] = spk
    return ann


def score(
    reference: list[tuple[float, float, str]],
    hypothesis: list[tuple[float, float, str]],
    collar: float = 0.25,
    skip_overlap: bool = False,
) -> dict[str, float]:
    """DER and its parts (as fractions of reference speech) plus JER for one file.

    Args:
        collar: width (s) of the no-score zone around each reference boundary; as in
            pyannote.metrics (and md-eval's convention halved), ``collar / 2`` on each side.
        skip_overlap: ignore regions where the reference has overlapping speakers.
    """
    from pyannote.metrics.diarization import DiarizationErrorRate, JaccardErrorRate

    ref = to_annotation(reference)
    hyp = to_annotation(hypothesis)
    d = DiarizationErrorRate(collar=collar, skip_overlap=skip_overlap)(ref, hyp, detailed=True)
    jer = JaccardErrorRate(collar=collar, skip_overlap=skip_overlap)(ref, hyp)
    total = d["total"] or 1.0
    return {
        "der": float(d["diarization error rate"]),
        "miss": float(d["missed detection"] / total),
        "false_alarm": float(d["false alarm"] / total),
        "confusion": float(d["confusion"] / total),
        "jer": float(jer),
        "scored_s": float(d["total"]),
        "ref_speakers": len({s for *_, s in reference}),
        "hyp_speakers": len({s for *_, s in hypothesis}),
    }


def load_audio(path: Path) -> tuple[np.ndarray, int]:
    """Read an audio file with soundfile and downmix it to mono float32."""
    import soundfile as sf

    from kimia_model.audio import downmix

    audio, sr = sf.read(str(path), dtype="float32", always_2d=False)
    return downmix(audio), int(sr)


def _find_inputs(inputs: Path) -> list[Path]:
    if inputs.is_file():
        return [inputs]
    return sorted(p for p in inputs.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)


def _references(reference: Path) -> dict[str, list[tuple[float, float, str]]]:
    refs: dict[str, list[tuple[float, float, str]]] = {}
    files = [reference] if reference.is_file() else sorted(reference.rglob("*.rttm"))
    for f in files:
        parsed = read_rttm(f)
        refs.update(parsed)
        if len(parsed) == 1:  # also let the file's stem match its audio
            refs.setdefault(f.stem, next(iter(parsed.values())))
    return refs


def eval_diarization(
    reference: Path,
    inputs: Path,
    config: Any,
    out_dir: Path,
    collar: float = 0.25,
    skip_overlap: bool = False,
    stage: Any = None,
) -> dict[str, Any]:
    """Diarize every input with ``config`` and score it against its RTTM reference.

    Audio files are matched to references by file stem (the RTTM's uri, or the RTTM file's
    stem when it holds a single uri). For each file, ``out_dir/<stem>.rttm`` (speaker turns)
    and ``out_dir/<stem>.segments.rttm`` (emitted segments) are written; ``out_dir/metrics.json``
    holds the per-file and pooled scores.

    Args:
        reference: an RTTM file or a directory of them.
        inputs: an audio file or a directory (searched recursively).
        config: a :class:`DiarizeConfig`.
        out_dir: where RTTM and metrics go.
        collar: DER/JER collar (s).
        skip_overlap: score only single-speaker reference regions.
        stage: a ready :class:`DiarizeStage` to reuse (its models stay loaded).

    Returns:
        ``{"files": [...], "total": {...}}``: ``total`` pools DER parts by scored time,
        averages JER, and adds the real-time factor and speaker-count error.

    Raises:
        EvalInputError: no audio input, or no reference for any input (nothing is written then).
    """
    from stages.diarize.stage import DiarizeStage

    reference, inputs, out_dir = Path(reference), Path(inputs), Path(out_dir)
    refs = _references(reference)
    files = [f for f in _find_inputs(inputs) if f.stem in refs]
    if not files:
        raise EvalInputError(f"no audio under {inputs} matches a reference uri in {reference} "
                         "(name each audio file after its RTTM uri or RTTM file stem)")
    out_dir.mkdir(parents=True, exist_ok=True)  # only once there is something to score
    if stage is None:
        stage = DiarizeStage(config)
        stage.check()
        stage.setup()
        stage._ready = True
    from kimia_model.audio import resample

    results = []
    for f in files:
        audio, sr = load_audio(f)
        audio16 = resample(audio, sr, 16000)
        t0 = time.perf_counter()
        turns, _, info = stage.diarize_audio(audio16)
        elapsed = time.perf_counter() - t0
        speech = [(t.start, t.end, f"S{t.speaker}") for t in info["speech_turns"]]
        segs = [(t.start, t.end, f"S{t.speaker}") for t in turns]
        write_rttm(out_dir / f"{f.stem}.rttm", f.stem, speech)
        write_rttm(out_dir / f"{f.stem}.segments.rttm", f.stem, segs)
        row = {"file": str(f), "uri": f.stem, **score(refs[f.stem], speech, collar, skip_overlap)}
        row["der_segments"] = score(refs[f.stem], segs, collar, skip_overlap)["der"]
        row["duration_s"] = audio.size / sr
        row["seconds"] = elapsed
        row["rtf"] = elapsed / max(row["duration_s"], 1e-9)
        results.append(row)
    w = np.array([r["scored_s"] for r in results])
    w = w / w.sum() if w.sum() > 0 else np.full(len(results), 1 / len(results))
    total = {k: float(np.dot(w, [r[k] for r in results])) for k in ("der", "miss", "false_alarm", "confusion")}
    total["jer"] = float(np.mean([r["jer"] for r in results]))
    total["der_segments"] = float(np.dot(w, [r["der_segments"] for r in results]))
    total["speaker_count_error"] = float(np.mean([abs(r["hyp_speakers"] - r["ref_speakers"]) for r in results]))
    total["rtf"] = sum(r["seconds"] for r in results) / max(sum(r["duration_s"] for r in results), 1e-9)
    total["files"] = len(results)
    report = {"collar": collar, "skip_overlap": skip_overlap, "files": results, "total": total}
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    return report


def turns_as_triples(turns: Iterable[Turn]) -> list[tuple[float, float, str]]:
    """``Turn`` objects as ``(start, end, "S<k>")`` triples for :func:`score`."""
    return [(t.start, t.end, f"S{t.speaker}") for t in turns]
