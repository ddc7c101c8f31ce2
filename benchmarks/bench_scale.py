"""Does a run scale with the number of recordings? Wall time per recording and driver memory.

Runs 100, 1,000 and 10,000 short generated recordings (a spoken phrase of about 1.5 s with
its own noise, so no two files are alike) through the local profile's cheap stages: decode,
Silero VAD segmentation, quality (no DNSMOS), filter and write. Each size runs in a fresh
process, so its peak RSS is the driver's own (Ray's workers are other processes).

What to look for: the time per recording is flat (10k within 1.2x of 1k; 100 carries the
start-up) and the driver's peak RSS does not grow with the dataset (10k within 1.1x of 1k),
because the driver moves no audio: writers commit on the workers and send back one small
outcome per recording.

Usage:
    python benchmarks/bench_scale.py                 # 100, 1000, 10000
    python benchmarks/bench_scale.py --sizes 100 1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "_work"
PHRASES = ["one two three", "good morning", "the data is ready", "please wait", "thank you very much",
           "open the door", "it is raining", "see you tomorrow"]
CHEAP = [
    "enhance.enabled=false", "diarize.enabled=false", "segment.enabled=true", "segment.min_segment_s=0.5",
    "transcribe.enabled=false",
    "tokenize.enabled=false", "roundtrip.enabled=false", "quality.dnsmos=false", "filter.keep_dropped=false",
]


def make_inputs(n: int, folder: Path) -> Path:
    """``n`` WAV files at 16 kHz: espeak-ng phrases with per-file noise (cached per size)."""
    done = folder / ".complete"
    if done.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    base = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(PHRASES):
            path = Path(tmp) / f"{i}.wav"
            subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True, capture_output=True)
            audio, sr = sf.read(path, dtype="float32")
            if sr != 16000:
                from kimia_model.audio import resample

                audio = resample(audio, sr, 16000)
            base.append(np.concatenate([np.zeros(3200, np.float32), audio, np.zeros(3200, np.float32)]))
    rng = np.random.default_rng(0)
    for i in range(n):
        clip = base[i % len(base)]
        noisy = clip + rng.normal(0, 0.002, clip.shape).astype(np.float32)
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        sf.write(sub / f"rec{i:06d}.wav", noisy, 16000, subtype="PCM_16")
    done.write_text(str(n))
    return folder


def one(n: int) -> dict:
    """Run the pipeline in this process on ``n`` recordings; returns the figures."""
    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_config
    from pipeline.run import run

    inputs = make_inputs(n, WORK / f"scale-{n}")
    out = Path(tempfile.mkdtemp(prefix=f"scale-{n}-"))
    cfg = load_config(ROOT / "configs" / "local.yaml", CHEAP)
    t0 = time.perf_counter()
    summary = run(cfg, str(inputs), out, progress=False)
    wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    this = summary["this_run"]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "recordings": n, "wall_s": round(wall, 2), "ms_per_recording": round(1000 * wall / n, 2),
        "driver_peak_rss_mb": round(rss_mb, 1), "segments_kept": this["segments_kept"],
        "first_commit_share": round(this["first_commit_seconds"] / wall, 3) if this.get("first_commit_seconds") else None,
        "by_status": this["recordings_by_status"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process of one size
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    rows = []
    for n in args.sizes:
        res = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise SystemExit(f"size {n} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{'recordings':>10} {'wall s':>8} {'ms/rec':>8} {'driver RSS MB':>14} {'first commit':>13} {'kept':>7}")
    for r in rows:
        print(f"{r['recordings']:>10} {r['wall_s']:>8} {r['ms_per_recording']:>8} {r['driver_peak_rss_mb']:>14} "
              f"{r['first_commit_share']!s:>13} {r['segments_kept']:>7}")
    by = {r["recordings"]: r for r in rows}
    if 1000 in by and 10000 in by:
        t = by[10000]["ms_per_recording"] / by[1000]["ms_per_recording"]
        m = by[10000]["driver_peak_rss_mb"] / by[1000]["driver_peak_rss_mb"]
        print(f"10k vs 1k: time per recording x{t:.2f} (target <= 1.2), driver RSS x{m:.2f} (target <= 1.1)")


if __name__ == "__main__":
    main()
