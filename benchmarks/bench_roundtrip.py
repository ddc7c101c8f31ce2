"""Does the round-trip check keep right labels and drop wrong ones, on real speech?

Evaluation set: every sentence of ``benchmarks/corpus.py`` spoken by espeak-ng in several
voices and rates (cached under ``benchmarks/_work``), plus the English pytest-audioeval clips
and the longer turns of pyannote's sample recording (human speech, STM words). Each clip is
judged with its correct label and with four wrong ones:

* ``other``: another clip's text (a different sentence);
* ``shuffled``: the label's words in another order;
* ``truncated``: the last 30-50 % of the words dropped;
* ``repeat``: a 2-4 word phrase said three times (Whisper's hallucinated loop).

Prints keep-rate on correct labels, drop-rate per wrong kind, the thresholds, and the real-time
factor (audio seconds judged per wall second; noisy on a shared machine).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_roundtrip.py [--voices 3] [--mode forced]

:func:`separation` is importable by other benchmarks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.corpus import SENTENCES, VOICES, WORK, _say  # noqa: E402

WRONG_KINDS = ("other", "shuffled", "truncated", "repeat")


# -- wrong labels ----------------------------------------------------------------------------------


def shuffled(text: str, rng: random.Random) -> str:
    """The words in another order (at least half of them moved)."""
    words = text.split()
    for _ in range(50):
        perm = rng.sample(words, len(words))
        if sum(a != b for a, b in zip(perm, words)) >= len(words) / 2:
            return " ".join(perm)
    return " ".join(reversed(words))


def truncated(text: str, rng: random.Random) -> str:
    """The first 50-70 % of the words: a label cut off before the speech ends."""
    words = text.split()
    keep = max(1, math.floor(len(words) * rng.uniform(0.5, 0.7)))
    return " ".join(words[:keep])


def repeated(text: str, rng: random.Random) -> str:
    """A 2-4 word phrase said three times where it is said once."""
    words = text.split()
    n = min(len(words), rng.randint(2, 4))
    i = rng.randrange(0, len(words) - n + 1)
    return " ".join(words[: i + n] + words[i : i + n] * 2 + words[i + n :])


def wrong_labels(texts: list[str], seed: int = 0) -> list[dict[str, str]]:
    """Per text, one wrong label of each kind (``other`` is a different text of the list)."""
    rng = random.Random(seed)
    out = []
    for i, t in enumerate(texts):
        others = [u for u in texts if u.strip().lower() != t.strip().lower()]
        out.append({"other": others[(i * 7 + 3) % len(others)], "shuffled": shuffled(t, rng),
                    "truncated": truncated(t, rng), "repeat": repeated(t, rng)})
    return out


# -- evaluation clips ------------------------------------------------------------------------------


def espeak_clips(voices_per_sentence: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Every corpus sentence in ``voices_per_sentence`` espeak-ng voices, cached as wav files."""
    folder = WORK / "roundtrip-eval"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    clips = []
    for i, text in enumerate(SENTENCES):
        for k in range(voices_per_sentence):
            voice, rate = VOICES[(i + 2 * k) % len(VOICES)], rng.randint(140, 180)
            path = folder / f"s{i:02d}-{voice.replace('+', '_')}-{rate}.wav"
            if not path.is_file():
                _say(text, voice, path, rate)
            audio, sr = sf.read(path, dtype="float32")
            clips.append({"id": path.stem, "text": text, "audio": audio, "sample_rate": sr, "source": f"espeak-ng:{voice}"})
    return clips


def _pkg_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def human_clips(min_words: int = 4) -> list[dict[str, Any]]:
    """pytest-audioeval's English clips and pyannote's sample turns with at least ``min_words``."""
    clips = []
    d = _pkg_dir("pytest_audioeval")
    if d is not None:
        for p in sorted((d / "samples" / "audio" / "en").glob("*.wav")):
            text = p.with_suffix(".txt").read_text().strip()
            if len(text.split()) >= min_words:
                audio, sr = sf.read(p, dtype="float32", always_2d=True)
                clips.append({"id": f"audioeval-{p.stem}", "text": text, "audio": audio.mean(1), "sample_rate": sr,
                              "source": "pytest-audioeval"})
    d = _pkg_dir("pyannote.audio")
    if d is not None and (d / "sample" / "sample.stm").is_file():
        audio, sr = sf.read(d / "sample" / "sample.wav", dtype="float32", always_2d=True)
        audio = audio.mean(1)
        for line in (d / "sample" / "sample.stm").read_text().splitlines():
            f = line.split(maxsplit=5)
            if len(f) == 6 and len(f[5].split()) >= min_words:
                a, b = float(f[3]), float(f[4])
                clips.append({"id": f"pyannote-{a:.2f}", "text": f[5], "sample_rate": sr, "source": "pyannote-sample",
                              "audio": audio[max(0, int((a - 0.1) * sr)) : int((b + 0.1) * sr)]})
    return clips


# -- the measurement -------------------------------------------------------------------------------


def judge_rows(stage: Any, clips: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    rows = [{"recording_id": c["id"], "segment_index": i, "text": t, "language": "en", "status": "ok",
             "audio": c["audio"], "sample_rate": c["sample_rate"], "duration_s": len(c["audio"]) / c["sample_rate"]}
            for i, (c, t) in enumerate(zip(clips, labels))]
    return stage(rows)


def separation(stage: Any, clips: list[dict[str, Any]], seed: int = 0,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Keep-rate on correct labels and drop-rate per wrong kind for a round-trip stage.

    Args:
        stage: a ``stages.roundtrip.RoundtripStage`` (set up or injectable), called on rows.
        clips: dicts with ``id``, ``text``, ``audio`` (float32 mono) and ``sample_rate``.
        seed: seeds the wrong labels.
        log: called with one line per misjudged label.

    Returns:
        ``{"n_correct", "keep_rate", "drop_rate": {kind: rate}, "drop_rate_all", "n_wrong",
        "audio_s", "wall_s", "rtf", "misjudged": [...]}``; rtf is wall time over audio time
        judged (every label counts its clip once).
    """
    wrong = wrong_labels([c["text"] for c in clips], seed)
    kinds = ["correct", *WRONG_KINDS]
    t0 = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        labels = [c["text"] for c in clips] if kind == "correct" else [w[kind] for w in wrong]
        results[kind] = judge_rows(stage, clips, labels)
    wall = time.perf_counter() - t0
    audio_s = len(kinds) * sum(len(c["audio"]) / c["sample_rate"] for c in clips)
    misjudged = []
    for kind, rows in results.items():
        for r in rows:
            bad = (r["rt_pass"] is not True) if kind == "correct" else (r["rt_pass"] is not False)
            if bad:
                misjudged.append({"kind": kind, "id": r["recording_id"], "text": r["text"], "rt_pass": r["rt_pass"],
                                  "why": r.get("rt_detail"), "heard": r.get("rt_text")})
                if log:
                    log(f"  {kind:9} {r['recording_id']:28} pass={r['rt_pass']!s:5} {r.get('rt_detail')!s:60} "
                        f"{r['text'][:50]!r}")
    keep = float(np.mean([r["rt_pass"] is True for r in results["correct"]]))
    drop = {k: float(np.mean([r["rt_pass"] is False for r in results[k]])) for k in WRONG_KINDS}
    n_wrong = sum(len(results[k]) for k in WRONG_KINDS)
    return {"n_correct": len(clips), "keep_rate": keep, "drop_rate": drop, "n_wrong": n_wrong,
            "drop_rate_all": float(sum(drop[k] * len(results[k]) for k in WRONG_KINDS) / n_wrong),
            "audio_s": audio_s, "wall_s": wall, "rtf": wall / audio_s, "misjudged": misjudged,
            "rows": results}


def main(argv: list[str] | None = None) -> int:
    from stages.base import StageContext
    from stages.roundtrip import RoundtripConfig, RoundtripStage

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="forced", choices=["forced", "audio", "label"])
    p.add_argument("--voices", type=int, default=3, help="espeak-ng voices per corpus sentence (20 sentences)")
    p.add_argument("--no-human", action="store_true", help="leave out the audioeval / pyannote clips")
    p.add_argument("--model", default="pkg:whisper-base")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dump", type=Path, default=None, help="write every row's measurements here (jsonl)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    clips = espeak_clips(args.voices, args.seed) + ([] if args.no_human else human_clips())
    cfg = RoundtripConfig(mode=args.mode, asr={"model": args.model, "language": "en", "beam_size": 1,
                                               "cpu_threads": args.threads})
    stage = RoundtripStage(cfg, StageContext())
    stage.check()
    stage.setup()
    print(f"{len(clips)} clips ({sum(c['source'].startswith('espeak') for c in clips)} espeak-ng), "
          f"mode={args.mode}, asr={args.model}")
    print("misjudged:")
    res = separation(stage, clips, args.seed, log=print)
    print(f"\n| labels | n | rate |\n|---|---|---|\n| correct kept | {res['n_correct']} | {res['keep_rate']:.1%} |")
    for k in WRONG_KINDS:
        print(f"| {k} dropped | {res['n_correct']} | {res['drop_rate'][k]:.1%} |")
    print(f"| all wrong dropped | {res['n_wrong']} | {res['drop_rate_all']:.1%} |")
    th = {k: getattr(cfg, k) for k in ("min_mean_logprob", "min_window_logprob", "window_tokens", "min_eot_logprob",
                                                        "forced_redecode", "max_wer")
          if hasattr(cfg, k)}
    print(f"\nthresholds: {th}")
    print(f"{res['audio_s']:.0f} s of audio judged in {res['wall_s']:.1f} s wall: RTF {res['rtf']:.3f} "
          f"({args.threads} threads, shared machine: noisy)")
    if args.dump:
        with args.dump.open("w") as f:
            for kind, rows in res["rows"].items():
                for r in rows:
                    f.write(json.dumps({"kind": kind, **{k: v for k, v in r.items() if k.startswith("rt_")},
                                        "id": r["recording_id"], "text": r["text"]}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
