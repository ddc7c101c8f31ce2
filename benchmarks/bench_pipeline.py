"""End-to-end benchmark of the spine on >= 10 minutes of generated multi-voice speech.

Prints, for one run of ``kimia-curate run`` with the local profile:

* end-to-end real-time factor (wall time / audio time, Ray start-up and model loads included);
* the ASR stage's real-time factor (its compute time / audio time);
* the ratio of end-to-end wall time to the bare model compute of the same audio, measured in
  the same process right after: every model stage of the same plan (diarization, ASR,
  quality, ...) over the same rows in the same batches, one after the other, with no Ray,
  no I/O, no encoding. Target: <= 1.3 (the pipeline adds under 30 % on top of the models).

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
    """Model-only time for the same audio, in this process, no Ray, no I/O, no encoding.

    Runs the run's own stage plan on the decoded recordings, stage after stage, each in its
    configured batch size, and times only the stages that run a model (segmentation or
    diarization, ASR, tokenizer, quality...). Decode, filter and encode are pipeline work.
    """
    import torch

    from pipeline.run import batch_recordings, plan_stages
    from stages.base import StageContext

    context = StageContext(cache_dir=Path(cfg.models.cache_dir).expanduser())
    stages = plan_stages(cfg, context)
    per_call = batch_recordings(cfg.ray.recordings_per_batch, {"GPU": float(torch.cuda.device_count())})
    rows = [r for f in sorted(folder.glob("*.wav")) for r in stages[0]([{"source": str(f), "status": "ok"}])]
    audio_s = sum(r["duration_s"] for r in rows)
    seconds: dict[str, float] = {}
    for stage in stages[1:-1]:  # decode ran above; write is pipeline work
        if not stage.uses_model:
            rows = stage(rows)
            continue
        stage.setup()
        stage._ready = True
        b = stage.config.batch_size if stage.level == "recording" else per_call
        t0 = time.perf_counter()
        rows = [out for i in range(0, len(rows), b) for out in stage(rows[i : i + b])]
        seconds[stage.name] = time.perf_counter() - t0
    return {"seconds": seconds, "audio_s": audio_s, "segments": sum(len(r.get("segments") or []) for r in rows)}


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
    print(format_summary(summary), flush=True)
    print()
    import ray

    ray.shutdown()
    bare = bare_compute(folder, cfg)
    r = summary["this_run"]
    audio_s = r["hours_in"] * 3600
    model_s = sum(bare["seconds"].values())
    asr_bare = bare["seconds"].get("transcribe", 0.0)
    print(f"corpus: {audio_s / 60:.1f} min of speech in {r['recordings']} recordings, {bare['segments']} segments")
    print(f"config: transcribe={cfg.transcribe.backend}:{cfg.transcribe.model} beam={cfg.transcribe.beam_size} "
          f"batch={cfg.transcribe.batch_size} compute_type={cfg.transcribe.compute_type}")
    print(f"end-to-end wall time            {wall:8.1f} s   RTF {wall / audio_s:.4f}")
    print(f"ASR stage compute (in pipeline) {r['stage_seconds'].get('transcribe', 0):8.1f} s   RTF {r['stage_rtf'].get('transcribe')}")
    parts = " + ".join(f"{k} {v:.1f} s" for k, v in bare["seconds"].items())
    print(f"bare models, same audio         {model_s:8.1f} s   RTF {model_s / audio_s:.4f}  ({parts})")
    print(f"bare ASR alone                  {asr_bare:8.1f} s   RTF {asr_bare / audio_s:.4f}")
    print(f"ratio end-to-end / bare models  {wall / model_s:8.3f}   (target <= 1.3)")
    first = r.get("first_commit_seconds")
    if first:
        print(f"first commit after              {first:8.1f} s   {100 * first / wall:.0f} % of wall (streaming commits)")


if __name__ == "__main__":
    main()
