"""How transcribe should spend a worker's CPUs: threads on one batch, or decoders on several.

CTranslate2 can put a worker's cores behind one decoder (``intra_threads``) or run several
decoders side by side over one copy of the weights (``inter_threads``, each called from its
own thread: what the transcribe stage's threaded actor does, ``transcribe.cpu_decoders``).
This script decodes the same segments (``benchmarks/corpus.py``'s speech cut into 25 s pieces,
two recordings' pieces per call, as the stage's calls get them with ``ray.recordings_per_batch``
2) in every layout the machine allows and prints the wall time and the speed-up over one
decoder on one thread:

* one decoder on 1, 2, ... CPUs threads;
* N decoders of one thread each, N calls at once.

    .venv/bin/python benchmarks/bench_decoders.py                # ~8 min of speech, seed 13
    .venv/bin/python benchmarks/bench_decoders.py --minutes 2

Same weights (pkg:whisper-base int8, beam 5) and the same settings in every layout, so the
labels agree up to float noise; a corpus WER per layout is printed to show it.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import make_corpus  # noqa: E402

from kimia_model.audio import resample  # noqa: E402
from stages.base import StageContext, node_cpus  # noqa: E402
from stages.textnorm import corpus_wer  # noqa: E402
from stages.transcribe import TranscribeConfig, build_asr  # noqa: E402

SR = 16000
PIECE_S = 25
RECORDINGS_PER_CALL = 2


def pieces(minutes: float, seed: int) -> tuple[list[list[np.ndarray]], list[str], float]:
    """Per recording its pieces of at most 25 s, the recordings' texts, and the audio seconds."""
    folder, meta = make_corpus(minutes=minutes, seed=seed, name=f"speed-{minutes:g}min-{seed}")
    clips, texts, total = [], [], 0.0
    for rec in meta:
        audio, sr = sf.read(folder / rec["file"], dtype="float32")
        audio = resample(audio, sr, SR)
        total += len(audio) / SR
        texts.append(" ".join(t[3] for t in rec["turns"]))
        cuts = [audio[s : s + PIECE_S * SR] for s in range(0, len(audio), PIECE_S * SR)]
        clips.append([c for c in cuts if len(c) > SR])
    return clips, texts, total


def run(recordings: list[list[np.ndarray]], threads: int, decoders: int) -> tuple[float, list[str]]:
    """Wall seconds to decode every recording's pieces, ``decoders`` calls at a time."""
    asr = build_asr(TranscribeConfig(model="pkg:whisper-base", compute_type="int8", cpu_threads=threads),
                    StageContext(), decoders=decoders)
    asr.transcribe(recordings[0][:1], SR)  # warm-up: the first call allocates
    calls = []
    for i in range(0, len(recordings), RECORDINGS_PER_CALL):
        mine = recordings[i : i + RECORDINGS_PER_CALL]
        calls.append(([c for rec in mine for c in rec], [str(i + k) for k, rec in enumerate(mine) for _ in rec]))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(decoders) as pool:
        results = list(pool.map(lambda call: asr.transcribe(call[0], SR, groups=call[1]), calls))
    return time.perf_counter() - t0, [r["text"] for batch in results for r in batch]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=8.0, help="generated corpus size (espeak-ng, cached)")
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args()

    recordings, texts, total = pieces(args.minutes, args.seed)
    cpus = node_cpus()
    print(f"{len(recordings)} recordings, {sum(map(len, recordings))} pieces of at most {PIECE_S} s, "
          f"{total:.1f} s of audio; {cpus} CPUs; whisper-base int8, beam 5, "
          f"{RECORDINGS_PER_CALL} recordings per call")
    layouts = [(t, 1) for t in range(1, cpus + 1)] + [(1, d) for d in range(2, cpus + 1)]
    base = None
    print(f"{'layout':34s} {'wall s':>7s} {'RTF':>7s} {'speed-up':>8s} {'WER':>7s}")
    for threads, decoders in layouts:
        dt, hyps = run(recordings, threads, decoders)
        base = base or dt
        # Pieces cut mid-word make this WER a consistency check across layouts, not a quality figure.
        wer = corpus_wer([" ".join(texts)], [" ".join(hyps)])
        name = f"{decoders} decoder{'s' if decoders > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"
        print(f"{name:34s} {dt:7.1f} {dt / total:7.4f} {base / dt:7.2f}x {wer:7.4f}")


if __name__ == "__main__":
    main()
