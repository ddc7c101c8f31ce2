"""The speed to beat: faster-whisper's own ``BatchedInferencePipeline`` on kimia-curate's weights.

Shared by the benchmarks that compare against it (``bench_asr_packing.py``, ``bench_speed.py``):
the same CTranslate2 Whisper directory kimia-curate resolves for ``pkg:whisper-base``, int8,
beam 5, Silero VAD, batch 8, as faster-whisper's README recommends for batched transcription.

Run as a script it is one whole process (imports, model load, decoding the files and
transcribing them), so its wall time compares with a whole ``kimia-curate run``::

    .venv/bin/python benchmarks/peer.py FOLDER --json texts.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH = 8
BEAM = 5


def peer_model(threads: int, model: str = "pkg:whisper-base") -> Any:
    """The peer pipeline on the weights kimia-curate resolves for ``model``."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    from stages.base import StageContext
    from stages.transcribe import TranscribeConfig, resolve_asr_model

    path = resolve_asr_model(TranscribeConfig(model=model), StageContext())
    whisper = WhisperModel(str(path), device="cpu", compute_type="int8", cpu_threads=threads)
    return BatchedInferencePipeline(whisper)


def transcribe_all(pipe: Any, inputs: list[Any], batch: int = BATCH, beam: int = BEAM) -> list[str]:
    """One transcript per input (a path or 16 kHz audio), segments joined by spaces."""
    texts = []
    for item in inputs:
        segments, _info = pipe.transcribe(str(item) if isinstance(item, Path) else item, batch_size=batch, beam_size=beam)
        texts.append(" ".join(s.text.strip() for s in segments))
    return texts


def run_batched_pipeline(recordings: list[np.ndarray], threads: int) -> tuple[list[str], float]:
    """Transcripts of 16 kHz recordings and the seconds it took, after a warm-up (model loaded)."""
    pipe = peer_model(threads)
    transcribe_all(pipe, [recordings[0][: 5 * 16000]])  # warm-up: first call allocates
    t0 = time.perf_counter()
    texts = transcribe_all(pipe, recordings)
    return texts, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description="faster-whisper BatchedInferencePipeline over a folder, whole process")
    ap.add_argument("folder", type=Path)
    ap.add_argument("--json", type=Path, required=True, help="where {file name: transcript} goes")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    files = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in (".wav", ".flac"))
    texts = transcribe_all(peer_model(args.threads), files)
    args.json.write_text(json.dumps(dict(zip([f.name for f in files], texts))))


if __name__ == "__main__":
    main()
