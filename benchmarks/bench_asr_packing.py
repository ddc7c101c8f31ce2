"""ASR on diarization turns: packed 30 s windows vs one window per turn, and a reference.

Diarization hands the transcribe stage many short speaker turns (2-6 s). Padding each to its
own 30 s Whisper window makes the encoder do 5-15x the work the speech needs; packing several
turns into one window (``transcribe.pack_windows``) removes most of it. This script measures
both on espeak-ng conversations with known turns and text (``benchmarks/corpus.py``), cutting
each turn as one segment, and runs faster-whisper's own ``BatchedInferencePipeline`` (Silero
VAD, batch 8) on the whole recordings as the speed to beat (RTF about 0.09 with base on a laptop CPU).

    .venv/bin/python benchmarks/bench_asr_packing.py                 # ~3 min of audio
    .venv/bin/python benchmarks/bench_asr_packing.py --minutes 1 --batch 16

Every mode uses the same CTranslate2 weights (pkg:whisper-base, int8, beam 5, 2 threads) and
detects the language itself, except the packed mode with ``language=en`` (what a run with a
known language would configure). Real-time factor = wall time / seconds of recordings (the turns
cover most of each recording, minus the pauses). WER and CER are corpus-level
(``stages.textnorm.corpus_wer``, ``corpus_cer``: total errors over total reference words or
characters); CER is printed beside WER so a Mandarin corpus reads the same table. The machine is shared, so
figures move with other load; the modes run back to back to be comparable.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import make_corpus
from peer import run_batched_pipeline

from kimia_model.audio import resample
from stages.base import StageContext
from stages.textnorm import corpus_cer, corpus_wer, wer
from stages.transcribe import TranscribeConfig, build_asr

SR = 16000


def load(minutes: float, seed: int) -> tuple[list[np.ndarray], list[list[tuple[np.ndarray, str]]]]:
    """Recordings at 16 kHz and, per recording, its turns cut as (audio, text)."""
    folder, meta = make_corpus(minutes=minutes, seed=seed, name=f"asr-packing-{minutes:g}min-{seed}")
    recordings, turns = [], []
    for rec in meta:
        audio, sr = sf.read(folder / rec["file"], dtype="float32")
        audio = resample(audio, sr, SR)
        recordings.append(audio)
        turns.append([(audio[int(s * SR) : int(e * SR)], text) for s, e, _voice, text in rec["turns"]])
    return recordings, turns


def run_segments(
    pack: bool, segments: list[np.ndarray], batch: int, threads: int, language: str | None = None
) -> tuple[list[dict], float]:
    cfg = TranscribeConfig(model="pkg:whisper-base", compute_type="int8", beam_size=5,
                           cpu_threads=threads, pack_windows=pack, language=language)
    asr = build_asr(cfg, StageContext())
    asr.transcribe(segments[:2], SR)  # warm-up: first call allocates
    t0 = time.perf_counter()
    out: list[dict] = []
    for i in range(0, len(segments), batch):  # as the stage sees them: batch_size rows per call
        out += asr.transcribe(segments[i : i + batch], SR)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="audio to generate (espeak-ng, cached)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32, help="segments per transcribe() call (stage batch_size)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    recordings, turns = load(args.minutes, args.seed)
    segments = [a for rec in turns for a, _ in rec]
    refs = [t for rec in turns for _, t in rec]
    total_s = sum(len(a) for a in recordings) / SR
    speech_s = sum(len(a) for a in segments) / SR
    lens = np.array([len(a) / SR for a in segments])
    print(f"{len(recordings)} recordings, {total_s:.1f} s; {len(segments)} turns, {speech_s:.1f} s "
          f"(turn length {lens.min():.1f}-{lens.max():.1f} s, median {np.median(lens):.1f} s); "
          f"whisper-base int8 beam 5, {args.threads} threads, {args.batch} segments per call")

    rows = []
    modes = (
        ("unpacked (1 window/turn)", False, None),
        ("packed windows, language per segment (8 s crops)", True, None),
        ("packed windows, language=en forced (no detection)", True, "en"),
    )
    for name, pack, language in modes:
        out, dt = run_segments(pack, segments, args.batch, args.threads, language)
        hyps = [o["text"] for o in out]
        langs = sorted({o["language"] for o in out})
        rows.append((name, dt, corpus_wer(refs, hyps), corpus_cer(refs, hyps), f"languages {langs}"))
        bad = [(r, h) for r, h in zip(refs, hyps) if wer(r, h) > 0.2]
        for r, h in bad[:3]:
            print(f"  {name}: WER>0.2  ref={r!r}\n  {' ' * len(name)}           hyp={h!r}")
    texts, dt = run_batched_pipeline(recordings, args.threads)
    rec_refs = [" ".join(t for _, t in rec) for rec in turns]
    rows.append(("faster-whisper BatchedInferencePipeline (whole recordings)", dt, corpus_wer(rec_refs, texts),
                 corpus_cer(rec_refs, texts), ""))

    print(f"{'mode':60s} {'wall s':>7s} {'RTF':>7s} {'RTF/speech':>10s} {'WER':>7s} {'CER':>7s}")
    for name, dt, w, c, note in rows:
        print(f"{name:60s} {dt:7.2f} {dt / total_s:7.4f} {dt / speech_s:10.4f} {w:7.4f} {c:7.4f}  {note}")
    print(f"speed-up packed vs unpacked: {rows[0][1] / rows[1][1]:.2f}x; "
          f"packed vs BatchedInferencePipeline: {rows[3][1] / rows[1][1]:.2f}x "
          f"(forced language: {rows[3][1] / rows[2][1]:.2f}x)")


if __name__ == "__main__":
    main()
