"""Label-only WER beside the peer over several generated corpora: per corpus, and pooled.

One 8-minute corpus says little about which labeller is more accurate. Whisper's words move
with where a decoding window starts and what shares it, so two labellers of the same weights
that cut windows differently differ by up to 0.03 WER on one corpus, either way. This script
runs faster-whisper's ``BatchedInferencePipeline`` (``benchmarks/peer.py``) and kimia-curate's
label-only run (``bench_speed.LABEL_ONLY``) on the corpora of several seeds, one process each
as in ``bench_speed.py``, and prints per seed both WERs and wall times, then:

* the mean of the per-seed WERs and the mean paired difference (label-only minus peer) with
  its standard error: a difference within two standard errors of zero is not one the
  corpora can tell apart;
* the WER over every word of every corpus (each file scored once, all pooled);
* the median of the per-seed wall-time ratios to the peer.

    .venv/bin/python benchmarks/bench_wer_seeds.py                    # seeds 13-22, ~15 min
    .venv/bin/python benchmarks/bench_wer_seeds.py --seeds 13,14 --set transcribe.pack_gap_s=0.5
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_speed import LABEL_ONLY, ROOT, kimia, run_peer, run_texts, score  # noqa: E402
from corpus import WORK, joined_corpus, parse_seeds  # noqa: E402


def paired(diffs: list[float]) -> tuple[float, float | None]:
    """Mean of paired differences and its standard error (None for fewer than two).

    >>> paired([0.01, -0.01, 0.03])
    (0.01, 0.011547005383792516)
    """
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, None
    return mean, statistics.stdev(diffs) / math.sqrt(len(diffs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=parse_seeds, default=parse_seeds("13-22"), help="e.g. 13-22 or 13,14,20")
    ap.add_argument("--minutes", type=float, default=8.0, help="generated corpus size per seed")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "local.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra override for the label-only run")
    ap.add_argument("--threads", type=int, default=2, help="peer's CTranslate2 threads")
    args = ap.parse_args()

    work = WORK / "bench-wer-seeds"
    work.mkdir(parents=True, exist_ok=True)
    all_refs: dict[str, str] = {}
    all_hyps: dict[str, dict[str, str]] = {"peer": {}, "label": {}}
    rows = []
    print(f"{'seed':>4s} {'audio s':>8s} {'peer WER':>9s} {'label WER':>10s} {'diff':>8s} "
          f"{'peer s':>7s} {'label s':>8s} {'x peer':>7s}")
    for seed in args.seeds:
        folder, meta = joined_corpus(args.minutes, [seed])
        refs = {rec["file"]: " ".join(t[3] for t in rec["turns"]) for rec in meta}
        audio_s = sum(sf.info(folder / name).duration for name in refs)
        peer_wall, _, peer_texts = run_peer(folder, work / "peer.json", args.threads)
        (label_wall, _), _ = kimia(folder, work / "out-label", args.config, LABEL_ONLY + args.sets)
        label_texts, _ = run_texts(work / "out-label")
        row = (seed, audio_s, score(refs, peer_texts), score(refs, label_texts), peer_wall, label_wall)
        rows.append(row)
        print(f"{seed:4d} {audio_s:8.1f} {row[2]:9.4f} {row[3]:10.4f} {row[3] - row[2]:+8.4f} "
              f"{peer_wall:7.1f} {label_wall:8.1f} {label_wall / peer_wall:7.2f}", flush=True)
        for name, ref in refs.items():
            all_refs[f"{seed}/{name}"] = ref
            all_hyps["peer"][f"{seed}/{name}"] = peer_texts.get(name, "")
            all_hyps["label"][f"{seed}/{name}"] = label_texts.get(name, "")

    mean_diff, se = paired([r[3] - r[2] for r in rows])
    worse = sum(r[3] > r[2] for r in rows)
    print(f"\nmean WER over {len(rows)} seeds: peer {statistics.fmean(r[2] for r in rows):.4f}, "
          f"label-only {statistics.fmean(r[3] for r in rows):.4f}; label-only minus peer {mean_diff:+.4f}"
          + (f" (standard error {se:.4f})" if se is not None else "")
          + f"; label-only worse on {worse} of {len(rows)}")
    print(f"WER over all {sum(len(r.split()) for r in all_refs.values())} words: "
          f"peer {score(all_refs, all_hyps['peer']):.4f}, label-only {score(all_refs, all_hyps['label']):.4f}")
    print(f"wall time, median of per-seed ratios: {statistics.median(r[5] / r[4] for r in rows):.2f}x the peer")


if __name__ == "__main__":
    main()
