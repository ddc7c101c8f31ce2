"""End-to-end benchmark of the spine on >= 10 minutes of generated multi-voice speech.

Prints, for one run of ``kimia-curate run`` with the local profile:

* end-to-end real-time factor (wall time / audio time, Ray start-up and model loads included);
* the ASR stage's real-time factor (its compute time / audio time);
* the ratio of end-to-end wall time to the bare model compute of the same audio, measured in
  the same process right after: Silero VAD over every recording, then the same Whisper
  backend over the same segments in the same batches, with no Ray, no I/O, no encoding.
  Target: <= 1.3 (the pipeline adds under 30 % on top of the models).

Usage: python benchmarks/bench_pipeline.py [--minutes 10] [--set transcribe.beam_size=1 ...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from corpus import WORK, make_corpus  # noqa: E402


def bare_compute(folder: Path, cfg) -> dict[str, float]:
    """Model-only time for the same audio: decode excluded, VAD + ASR included."""
    from stages.base import StageContext
    from stages.decode import DecodeStage
    from stages.segment import SegmentStage
    from stages.transcribe import build_asr

    context = StageContext(cache_dir=Path(cfg.models.cache_dir).expanduser())
    decode = DecodeStage(cfg.decode, context)
    recs = [r for f in sorted(folder.glob("*.wav")) for r in decode([{"source": str(f), "status": "ok"}])]
    seg = SegmentStage(cfg.segment, context)
    seg.setup()
    asr = build_asr(cfg.transcribe, context, "cpu")
    t0 = time.perf_counter()
    segments = []
    for r in recs:
        segments.extend(seg.process_batch([r]))
    t_vad = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = cfg.transcribe.batch_size
    for i in range(0, len(segments), b):
        asr.transcribe([s["audio"] for s in segments[i : i + b]], cfg.decode.sample_rate)
    t_asr = time.perf_counter() - t0
    audio_s = sum(r["duration_s"] for r in recs)
    return {"vad_s": t_vad, "asr_s": t_asr, "audio_s": audio_s, "segments": len(segments)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    from pipeline.config import load_config
    from pipeline.run import format_summary, run

    folder, _ = make_corpus(args.minutes)
    cfg = load_config(args.config, args.overrides)
    out = WORK / "bench-pipeline-out"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run(cfg, str(folder), out, progress=False)
    wall = time.perf_counter() - t0
    import ray

    ray.shutdown()
    bare = bare_compute(folder, cfg)
    r = summary["this_run"]
    audio_s = r["hours_in"] * 3600
    model_s = bare["vad_s"] + bare["asr_s"]
    print(format_summary(summary))
    print()
    print(f"corpus: {audio_s / 60:.1f} min of speech in {r['recordings']} recordings, {bare['segments']} segments")
    print(f"config: transcribe={cfg.transcribe.backend}:{cfg.transcribe.model} beam={cfg.transcribe.beam_size} "
          f"batch={cfg.transcribe.batch_size} compute_type={cfg.transcribe.compute_type}")
    print(f"end-to-end wall time            {wall:8.1f} s   RTF {wall / audio_s:.4f}")
    print(f"ASR stage compute (in pipeline) {r['stage_seconds'].get('transcribe', 0):8.1f} s   RTF {r['stage_rtf'].get('transcribe')}")
    print(f"bare models, same audio         {model_s:8.1f} s   RTF {model_s / audio_s:.4f}  "
          f"(VAD {bare['vad_s']:.1f} s + ASR {bare['asr_s']:.1f} s, RTF ASR {bare['asr_s'] / audio_s:.4f})")
    print(f"ratio end-to-end / bare models  {wall / model_s:8.3f}   (target <= 1.3)")


if __name__ == "__main__":
    main()
