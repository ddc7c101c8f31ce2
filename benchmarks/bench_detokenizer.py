"""Detokenizer real-time factor (tiny random config; CPU, and CUDA when present).

RTF = compute seconds / seconds of audio produced (lower is faster). Reported separately for
the flow-matching ODE (30 Euler points, the upstream default), the vocoder, the whole
streamed path, and the time to the first audio chunk (what a listener waits for).

Run: ``cd /work/main && .venv/bin/python benchmarks/bench_detokenizer.py [--seconds 20] [--threads 2]``
The tiny config (hidden 64, depth 2; BigVGAN with 64 initial channels) measures the
streaming machinery, not the cost of the real 2304-wide, 16-layer model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny-model factories

from factories import random_tiny_detokenizer  # noqa: E402
from kimia_model.detokenizer import TOKEN_UPSAMPLE, Detokenizer, StreamingConfig  # noqa: E402


def _bench(device: str, seconds: float, repeats: int) -> None:
    det = random_tiny_detokenizer(seed=0, streaming=StreamingConfig())
    det = Detokenizer(det.flow, det.flow_cfg, det.vocoder, det.streaming, device=device)
    n_tokens = int(seconds * 12.5)
    tokens = np.random.RandomState(0).randint(0, 64, n_tokens)
    audio_s = n_tokens / 12.5
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    det.detokenize(tokens[:40])  # warm-up (allocations, kernels)
    sync()
    flow_t, voc_t, total_t, first_t = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mel = torch.cat(list(det.stream_mel(tokens)))
        sync()
        t1 = time.perf_counter()
        det.vocode(mel)
        sync()
        t2 = time.perf_counter()
        it = det.stream(tokens)
        next(it)
        sync()
        t3 = time.perf_counter()
        for _ in it:
            pass
        sync()
        t4 = time.perf_counter()
        flow_t.append(t1 - t0)
        voc_t.append(t2 - t1)
        first_t.append(t3 - t2)
        total_t.append(t4 - t2)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    print(f"[{device}] {audio_s:.1f} s of audio ({n_tokens} tokens, {n_tokens * TOKEN_UPSAMPLE} mel frames), "
          f"median of {repeats}:")
    print(f"  flow ODE (30 pts) RTF {med(flow_t) / audio_s:.4f}   vocoder RTF {med(voc_t) / audio_s:.4f}   "
          f"streamed end-to-end RTF {med(total_t) / audio_s:.4f}")
    print(f"  first chunk after {med(first_t) * 1000:.0f} ms "
          f"(2.4 s of tokens; audio speed-up {audio_s / med(total_t):.1f}x real time)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="audio length to detokenize")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} CPU threads")
    _bench("cpu", args.seconds, args.repeats)
    if torch.cuda.is_available():
        _bench("cuda", args.seconds, args.repeats)
    else:
        print("[cuda] no GPU visible: skipped")


if __name__ == "__main__":
    main()
