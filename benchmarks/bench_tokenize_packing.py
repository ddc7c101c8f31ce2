"""Tokenize with and without packing segments into shared 30 s windows: agreement and speed.

With plain Whisper (``padding: full``) every segment is padded to a 30 s window, so a 3 s
diarization turn costs a whole encoder pass. Packing a recording's segments into shared
windows (``WhisperVQTokenizer(pack_gap_s=...)``, never across recordings) cuts that, and a
segment's own samples stay the same; but Whisper's encoder adds *absolute* sinusoidal
positions, so a segment moved away from the window start is encoded differently. This prints,
on the turns of generated conversations (``benchmarks/corpus.py``), the share of tokens that
are the same, the cosine similarity of the continuous features, and the time of both.

Measured (2 min corpus, 25 turns, whisper-base-1024): 1.2-2.3x faster (contended machine), but only 26 % of tokens
equal and feature cosine 0.72 (a segment packed at offset 0: 77 %; at later offsets: ~0 %).
Packing is therefore not offered by the tokenize stage: the tokens would mean something else
than the codebook was fitted on.

    .venv/bin/python benchmarks/bench_tokenize_packing.py [--minutes 2] [--gap 1.0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from corpus import make_corpus  # noqa: E402

from kimia_model.audio import resample  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--gap", type=float, default=1.0, help="tokenize.pack_gap_s")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from kimia_model.whisper_vq.timing import SAMPLES_PER_TOKEN, tokens_in_window
    from stages.base import StageContext
    from stages.tokenize import TokenizeConfig, TokenizeStage

    torch.set_num_threads(args.threads)
    folder, meta = make_corpus(minutes=args.minutes, seed=args.seed, name=f"speed-{args.minutes:g}min-{args.seed}")
    rows = []
    for rec in meta:
        audio, sr = sf.read(folder / rec["file"], dtype="float32")
        audio = resample(audio, sr, 16000)
        for k, (s, e, _voice, _text) in enumerate(rec["turns"]):
            rows.append({"recording_id": rec["file"], "segment_index": k, "status": "ok", "sample_rate": 16000,
                         "audio": audio[int(s * 16000) : int(e * 16000)]})
    speech_s = sum(len(r["audio"]) for r in rows) / 16000
    out = {}
    for pack in (False, True):
        stage = TokenizeStage(TokenizeConfig(store_features=True, torch_threads=args.threads), StageContext())
        stage.setup()
        tok = stage._tok
        assert tok is not None and tok.padding == "full"
        tok.pack_gap = tokens_in_window(int(args.gap * 16000)) * SAMPLES_PER_TOKEN if pack else None
        t0 = time.perf_counter()
        res = []
        for rec in meta:  # one recording per call
            audios = [r["audio"] for r in rows if r["recording_id"] == rec["file"]]
            for o in tok(audios, tokens=True, features=True, groups=[rec["file"]] * len(audios)):
                res.append({"semantic_tokens": o.tokens, "whisper_features": o.features})
        out[pack] = (res, time.perf_counter() - t0)
    (plain, t_plain), (packed, t_packed) = out[False], out[True]
    same = sum(int((a["semantic_tokens"] == b["semantic_tokens"]).sum()) for a, b in zip(plain, packed))
    total = sum(len(a["semantic_tokens"]) for a in plain)
    cos = []
    for a, b in zip(plain, packed):
        fa, fb = a["whisper_features"].astype(np.float32), b["whisper_features"].astype(np.float32)
        cos += list((fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1) + 1e-9))
    print(f"{len(rows)} segments ({speech_s:.1f} s of speech, {len(meta)} recordings), gap {args.gap} s, "
          f"{args.threads} threads")
    print(f"unpacked: {t_plain:6.1f} s  RTF {t_plain / speech_s:.4f}")
    print(f"packed:   {t_packed:6.1f} s  RTF {t_packed / speech_s:.4f}  ({t_plain / t_packed:.2f}x faster)")
    print(f"tokens equal: {same}/{total} = {same / total:.3f}; feature cosine mean {np.mean(cos):.4f}, "
          f"5th percentile {np.percentile(cos, 5):.4f}")


if __name__ == "__main__":
    main()
