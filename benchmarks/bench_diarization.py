"""Diarization benchmark: generated espeak-ng conversations and the pyannote sample.

Generates multi-speaker conversations with espeak-ng (3 to 6 voices, known turns, pauses,
overlaps, a few long monologues, background noise at several SNRs), runs every configured
backend with and without Kimi-Audio post-processing, and prints a table of DER (collar
0.25 s), its confusion part, JER, speaker-count error and real-time factor; then the same on
pyannote's shipped ``sample.wav`` against ``sample.rttm``.

    .venv/bin/python benchmarks/bench_diarization.py            # full table
    .venv/bin/python benchmarks/bench_diarization.py --quick    # 4 conversations
    .venv/bin/python benchmarks/bench_diarization.py --calibrate   # measure embedder calibration
    .venv/bin/python benchmarks/bench_diarization.py --pyannote DIR  # add a real pyannote pipeline
    .venv/bin/python benchmarks/bench_diarization.py --embedders resemblyzer,voicefilter
        # issue-12 table per embedder: 9 conversations (2-4 voices, 60-150 s), pyannote's
        # sample, 9 single-voice espeak clips (5-120 s) + 27 audioeval clips: DER, exact
        # speaker-count rate, one-speaker rate on single voices, RTF
    .venv/bin/python benchmarks/bench_diarization.py --calibrate --embedders voicefilter

Backends: ``offline`` with the packaged resemblyzer embedder always; ``pyannote`` only with
``--pyannote DIR`` (real weights are not reachable here). ``--pyannote-random`` times the
pyannote code path on random weights (speed only: its DER is meaningless and not printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimia_model.audio import resample  # noqa: E402

SR = 16000
SENTENCES = [
    "I think we should look at the numbers again before the meeting tomorrow.",
    "That sounds reasonable to me.",
    "Well, the last time we tried that it took almost three weeks.",
    "Could you send me the report when it is ready?",
    "Of course. I will finish it tonight.",
    "The weather has been strange this spring, warm one day and cold the next.",
    "Do you remember where we left the keys?",
    "No, but I am sure they are somewhere in the kitchen.",
    "Let me explain how the new system works, step by step.",
    "First you open the main panel, then you choose a project.",
    "Right, and after that the results appear on the left.",
    "Honestly, I never liked that design very much.",
    "We could ask the team what they prefer.",
    "That is a good idea. Let us vote on Friday.",
    "My brother moved to a small town by the sea last year.",
    "He says the mornings are quiet and the coffee is excellent.",
    "Seven hundred and twenty people signed up for the course.",
    "Really? That is far more than we expected.",
    "Please keep the door closed, the cat keeps escaping.",
    "The train was late again, so I walked the last two miles.",
]
# (espeak voice, variant, pitch 0-99, words per minute): chosen to be as distinct as espeak allows.
VOICES = [
    ("en-us", "m3", 35, 165),
    ("en-gb", "f2", 70, 150),
    ("en-gb-scotland", "m7", 20, 180),
    ("en-us", "f4", 85, 160),
    ("en-029", "m1", 50, 135),
    ("en-gb-x-rp", "f5", 60, 175),
]


def tts(text: str, voice: tuple[str, str, int, int], cache: Path) -> np.ndarray:
    """espeak-ng speech at 16 kHz with leading/trailing silence trimmed (exact turn edges)."""
    import soundfile as sf

    name, variant, pitch, wpm = voice
    key = cache / (hashlib.sha1(repr((text, voice)).encode()).hexdigest()[:16] + ".wav")
    if not key.exists():
        subprocess.run(
            ["espeak-ng", "-v", f"{name}+{variant}", "-p", str(pitch), "-s", str(wpm), "-w", str(key), text],
            check=True,
            capture_output=True,
        )
    audio, sr = sf.read(key, dtype="float32")
    audio = resample(audio, sr, SR)
    idx = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
    return audio[idx[0] : idx[-1] + 1] if idx.size else audio


def make_conversation(
    seed: int, n_voices: int, snr_db: float | None, n_turns: int, cache: Path
) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """One conversation: audio at 16 kHz and its reference turns ``(start, end, speaker)``."""
    rng = np.random.default_rng(seed)
    voices = [VOICES[i] for i in rng.permutation(len(VOICES))[:n_voices]]
    order = list(range(n_voices))  # everyone speaks early, then random turn-taking
    while len(order) < n_turns:
        nxt = int(rng.integers(n_voices))
        if nxt != order[-1] or rng.random() < 0.15:  # sometimes the same speaker continues
            order.append(nxt)
    pieces, ref = [], []
    t = 0.5
    prev_end = 0.5
    for spk in order:
        n_sent = 3 if rng.random() < 0.12 else 1  # a few long monologues
        speech = np.concatenate(
            [
                np.concatenate([tts(SENTENCES[int(rng.integers(len(SENTENCES)))], voices[spk], cache),
                                np.zeros(int(rng.uniform(0.2, 0.5) * SR), np.float32)])
                for _ in range(n_sent)
            ]
        )  # fmt: skip
        speech = speech * rng.uniform(0.5, 1.0)
        if rng.random() < 0.15 and ref:
            start = prev_end - rng.uniform(0.3, 0.8)  # overlap with the previous turn
        else:
            start = prev_end + rng.uniform(0.15, 1.2)
        start = max(start, 0.1)
        pieces.append((start, speech))
        # Reference follows the speech inside the turn (sentence pauses are not speech).
        active = np.abs(speech) > 0.02 * np.abs(speech).max()
        edges = np.flatnonzero(np.diff(np.r_[0, active.astype(np.int8), 0]))
        for a, b in zip(edges[::2], edges[1::2], strict=True):
            ref.append((start + a / SR, start + b / SR, f"spk{spk}"))
        prev_end = max(prev_end, start + speech.size / SR)
        t = prev_end
    total = int((t + 0.7) * SR)
    audio = np.zeros(total, np.float32)
    for start, speech in pieces:
        s = int(start * SR)
        audio[s : s + speech.size] += speech[: total - s]
    ref = _merge_close(ref, 0.3)  # pauses < 0.3 s inside words/sentences are not turn breaks
    if snr_db is not None:
        noise = rng.standard_normal(total).astype(np.float32)
        noise = np.cumsum(noise) * 0.02 + noise * 0.5  # reddish: more low-frequency rumble
        noise -= np.convolve(noise, np.ones(400) / 400, mode="same")
        mask = np.zeros(total, bool)
        for a, b, _ in ref:
            mask[int(a * SR) : int(b * SR)] = True
        p_speech = float(np.mean(audio[mask] ** 2))
        noise *= np.sqrt(p_speech / (10 ** (snr_db / 10)) / float(np.mean(noise**2)))
        audio = audio + noise
    audio /= max(1.0, float(np.abs(audio).max()) / 0.95)
    return audio.astype(np.float32), ref


def _merge_close(ref: list[tuple[float, float, str]], gap: float) -> list[tuple[float, float, str]]:
    out: list[tuple[float, float, str]] = []
    for a, b, s in sorted(ref):
        same = [i for i in range(len(out) - 1, max(-1, len(out) - 4), -1) if out[i][2] == s]
        if same and a - out[same[0]][1] < gap and same[0] == len(out) - 1:
            out[-1] = (out[-1][0], max(b, out[-1][1]), s)
        else:
            out.append((a, b, s))
    return out


def dataset(quick: bool, cache: Path) -> list[tuple[str, np.ndarray, list[tuple[float, float, str]]]]:
    """The generated conversations: voices 3-6 x SNR clean/20/10/5 dB."""
    grid = [(3, None), (4, 10.0), (5, 20.0), (6, 5.0)] if quick else [
        (v, s) for v in (3, 4, 5, 6) for s in (None, 20.0, 10.0, 5.0)
    ]  # fmt: skip
    out = []
    for i, (v, snr) in enumerate(grid):
        audio, ref = make_conversation(1000 + i, v, snr, n_turns=4 * v + 6, cache=cache)
        out.append((f"conv{i:02d}_v{v}_{'clean' if snr is None else f'{snr:g}dB'}", audio, ref))
    return out


def brief_conversations(quick: bool, cache: Path) -> list[tuple[str, np.ndarray, list[tuple[float, float, str]]]]:
    """Issue-12 set: 2-4 voices, 60-150 s each, clean / 20 dB / 10 dB (quick: one per count)."""
    grid = [(2, None), (3, 20.0), (4, 10.0)] if quick else [
        (v, s) for v in (2, 3, 4) for s in (None, 20.0, 10.0)
    ]  # fmt: skip
    out = []
    for i, (v, snr) in enumerate(grid):
        audio, ref = make_conversation(2000 + i, v, snr, n_turns=6 + 4 * v, cache=cache)
        out.append((f"brief{i:02d}_v{v}_{'clean' if snr is None else f'{snr:g}dB'}", audio, ref))
    return out


def make_solo(seed: int, seconds: float, snr_db: float | None, cache: Path):
    """One espeak voice talking for about ``seconds`` (sentences with 0.2-0.8 s pauses)."""
    rng = np.random.default_rng(seed)
    voice = VOICES[int(rng.integers(len(VOICES)))]
    pieces, ref, t = [], [], 0.3
    while t < seconds - 0.5:
        speech = tts(SENTENCES[int(rng.integers(len(SENTENCES)))], voice, cache) * rng.uniform(0.6, 1.0)
        speech = speech[: int((seconds - 0.3 - t) * SR)]
        pieces.append((t, speech))
        ref.append((t, t + speech.size / SR, "spk0"))
        t += speech.size / SR + rng.uniform(0.2, 0.8)
    audio = np.zeros(int(seconds * SR), np.float32)
    for start, speech in pieces:
        s0 = int(start * SR)
        audio[s0 : s0 + speech.size] += speech[: audio.size - s0]
    if snr_db is not None:
        noise = rng.standard_normal(audio.size).astype(np.float32)
        p = float(np.mean(np.concatenate([sp for _, sp in pieces]) ** 2))
        audio += noise * np.sqrt(p / 10 ** (snr_db / 10))
    return audio.astype(np.float32), _merge_close(ref, 0.3)


def solo_clips(quick: bool, cache: Path) -> list[tuple[str, np.ndarray, list[tuple[float, float, str]]]]:
    """Single-voice recordings of 5-120 s (each must come out as one speaker)."""
    grid = [(20, None), (30, 20.0), (60, None)] if quick else [
        (5, None), (10, 20.0), (20, None), (25, 10.0), (30, None), (30, 20.0), (45, None), (60, 10.0), (120, None)
    ]  # fmt: skip
    out = []
    for i, (secs, snr) in enumerate(grid):
        audio, ref = make_solo(3000 + i, secs, snr, cache)
        out.append((f"solo{i:02d}_{secs}s_{'clean' if snr is None else f'{snr:g}dB'}", audio, ref))
    return out


def pyannote_sample() -> tuple[str, np.ndarray, list[tuple[float, float, str]]]:
    import pyannote.audio

    from stages.diarize.evaluate import load_audio, read_rttm

    d = Path(pyannote.audio.__file__).parent / "sample"
    audio, sr = load_audio(d / "sample.wav")
    return "pyannote_sample", resample(audio, sr, SR), next(iter(read_rttm(d / "sample.rttm").values()))


# -- calibration --------------------------------------------------------------------------------


def audioeval_clips() -> list[tuple[str, np.ndarray, list[tuple[float, float, str]]]]:
    """pytest-audioeval's clips (one voice per language), each a single-speaker file."""
    import pytest_audioeval

    from stages.diarize.evaluate import load_audio

    out = []
    for f in sorted((Path(next(iter(pytest_audioeval.__path__))) / "samples" / "audio").glob("*/*.wav")):
        audio, sr = load_audio(f)
        out.append((f"audioeval_{f.parent.name}_{f.stem}", resample(audio, sr, SR), [(0.0, audio.size / sr, f.parent.name)]))
    return out


def chunk_embeddings(files, embedder) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """1.5 s chunk embeddings (>= 1 s) of the non-overlapped reference turns, with speaker ids."""
    from stages.diarize.postprocess import Turn, remove_overlaps, split_into_chunks

    out = []
    for name, audio, ref in files:
        ids = {s: i for i, s in enumerate(sorted({s for *_, s in ref}))}
        turns = remove_overlaps([Turn(a, b, ids[s]) for a, b, s in ref])
        chunks = [c for c in split_into_chunks(turns, 1.5) if c.end - c.start >= 1.0]
        emb = embedder.embed([audio[int(c.start * SR) : int(c.end * SR)] for c in chunks])
        out.append((name, emb, np.array([c.speaker for c in chunks])))
    return out


def similarity_stats(data, mean: np.ndarray | None) -> dict:
    """Same/different-speaker cosines of chunks and of half-speaker centroids."""

    def norm(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    same, diff, c_same, c_diff = [], [], [], []
    for _, emb, lab in data:
        x = norm(emb - (0 if mean is None else mean))
        sim = x @ x.T
        iu = np.triu_indices(len(lab), 1)
        eq = lab[iu[0]] == lab[iu[1]]
        if eq.any():
            same.append(float(np.median(sim[iu][eq])))
        if (~eq).any():
            diff.append(float(np.median(sim[iu][~eq])))
        halves = {}
        for k in np.unique(lab):
            idx = np.flatnonzero(lab == k)
            if idx.size >= 4:
                halves[k] = (norm(x[idx[::2]].mean(0)), norm(x[idx[1::2]].mean(0)))
        for k, (a, b) in halves.items():
            c_same.append(float(a @ b))
            c_diff += [float(a @ a2) for k2, (a2, _) in halves.items() if k2 > k]
    r = lambda v: round(float(v), 3)  # noqa: E731
    return {
        "chunk_same_median": r(np.median(same)), "chunk_diff_median": r(np.median(diff)),
        "centroid_same_median": r(np.median(c_same)), "centroid_same_p5": r(np.percentile(c_same, 5)),
        "centroid_diff_median": r(np.median(c_diff)), "centroid_diff_p95": r(np.percentile(c_diff, 95)),
        "centroid_diff_max": r(np.max(c_diff)),
    }  # fmt: skip


def calibrate(convs, sample, embedder, out_dir: Path | None, name: str = "resemblyzer") -> dict:
    """Measure the population mean embedding and the decision points around it.

    Fitted on the generated conversations (+ pytest-audioeval's clips for the mean) only;
    pyannote's sample is held out and its figures printed as a check. The mean averages
    per-speaker centroids, so each voice counts once however long it speaks. Decision points
    (see ``Calibration.from_boundaries``): merge = 5th percentile of same-speaker centroid
    cosine; re-assign = midpoint of the median same- and different-speaker chunk cosines.
    """

    def norm(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    fit = chunk_embeddings(convs + audioeval_clips(), embedder)
    held = chunk_embeddings(sample, embedder)
    mean = np.mean([norm(e[lab == k].mean(0)) for _, e, lab in fit for k in np.unique(lab)], axis=0)
    conv = [d for d in fit if d[0].startswith("conv")]
    centred = similarity_stats(conv, mean)
    points = {
        "merge_raw": centred["centroid_same_p5"],
        "reassign_raw": round((centred["chunk_same_median"] + centred["chunk_diff_median"]) / 2, 3),
        "source": f"{len(conv)} espeak-ng conversations + {len(fit) - len(conv)} audioeval clips; "
        "population mean removed; pyannote sample held out",
    }
    report = {
        "voices_in_mean": int(sum(len(np.unique(lab)) for _, _, lab in fit)),
        "raw conversations": similarity_stats(conv, None),
        "raw sample (held out)": similarity_stats(held, None),
        "centred conversations": centred,
        "centred sample (held out)": similarity_stats(held, mean),
        "decision points": points,
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        np.save(out_dir / f"{name}_mean.npy", mean.astype(np.float32))
        old = out_dir / f"{name}.json"
        if old.exists():  # keep the one-voice test's floors (set from the count experiments)
            prev = json.loads(old.read_text())
            points.update({k: v for k, v in prev.items() if k.startswith("single_")})
        (out_dir / f"{name}.json").write_text(json.dumps(points, indent=1) + "\n")
        report["saved"] = str(out_dir)
    return report


# -- the benchmark --------------------------------------------------------------------------------


def run(stage, files, collar: float = 0.25) -> dict:
    from stages.diarize.evaluate import score, turns_as_triples

    rows, seconds, dur = [], 0.0, 0.0
    for name, audio, ref in files:
        t0 = time.perf_counter()
        _, _, info = stage.diarize_audio(audio)
        seconds += time.perf_counter() - t0
        dur += audio.size / SR
        s = score(ref, turns_as_triples(info["speech_turns"]), collar)
        s["name"] = name
        rows.append(s)
    w = np.array([r["scored_s"] for r in rows])
    w = w / w.sum()
    agg = {k: float(np.dot(w, [r[k] for r in rows])) for k in ("der", "miss", "false_alarm", "confusion", "jer")}
    agg["spk_err"] = float(np.mean([abs(r["hyp_speakers"] - r["ref_speakers"]) for r in rows]))
    agg["rtf"] = seconds / dur
    agg["per_file"] = rows
    return agg


def count_table(embedders: list[str], quick: bool, cache: Path, threads: int) -> dict:
    """Issue-12 figures per embedder (default stage, post-processing on).

    DER (collar 0.25 s) on the 2-4 voice conversations and on pyannote's sample, the share of
    recordings whose speaker count is exact (conversations, sample, solo clips, audioeval
    clips), the share of single-voice recordings that come out as one speaker, and RTF.
    """
    convs = brief_conversations(quick, cache)
    sample = [pyannote_sample()]
    solos = solo_clips(quick, cache) + audioeval_clips()
    out = {}
    for emb in embedders:
        stage = build_stage(embedding=emb)
        r_conv, r_sample, r_solo = run(stage, convs), run(stage, sample), run(stage, solos)
        rows = r_conv["per_file"] + r_sample["per_file"] + r_solo["per_file"]
        secs = sum(a.size for _, a, _ in convs + sample + solos) / SR
        rtf = (r_conv["rtf"] * sum(a.size for _, a, _ in convs) + r_sample["rtf"] * sample[0][1].size
               + r_solo["rtf"] * sum(a.size for _, a, _ in solos)) / SR / secs  # fmt: skip
        out[emb] = {
            "der_conv": r_conv["der"], "der_sample": r_sample["der"],
            "count_exact": float(np.mean([r["hyp_speakers"] == r["ref_speakers"] for r in rows])),
            "solo_one": float(np.mean([r["hyp_speakers"] == 1 for r in r_solo["per_file"]])),
            "rtf": rtf, "n": len(rows), "n_solo": len(r_solo["per_file"]),
            "per_file": [(r["name"], round(r["der"], 3), r["hyp_speakers"], r["ref_speakers"]) for r in rows],
        }  # fmt: skip
    hdr = f"{'embedder':14s} {'DER conv':>9s} {'DER sample':>11s} {'count exact':>12s} {'solo=1':>8s} {'RTF':>7s}"
    print(f"\n{len(convs)} conversations (2-4 voices, {min(a.size for _, a, _ in convs) / SR:.0f}-"
          f"{max(a.size for _, a, _ in convs) / SR:.0f} s), pyannote sample, {len(solos)} single-voice clips; "
          f"{threads} threads")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for emb, r in out.items():
        print(f"{emb:14s} {100*r['der_conv']:8.1f}% {100*r['der_sample']:10.1f}% "
              f"{100*r['count_exact']:11.0f}% {100*r['solo_one']:7.0f}% {r['rtf']:7.3f}")  # fmt: skip
    for emb, r in out.items():
        bad = [f"{n} {h}/{t}" for n, _, h, t in r["per_file"] if h != t]
        print(f"  {emb}: wrong counts (found/true): {', '.join(bad) or 'none'}")
        print(f"  {emb}: per conversation DER: " + ", ".join(f"{n}={100*d:.1f}" for n, d, _, _ in r["per_file"]
                                                        if n.startswith(("brief", "pyannote"))))  # fmt: skip
    return out


def build_stage(**overrides):
    from stages.diarize import DiarizeConfig, DiarizeStage

    stage = DiarizeStage(DiarizeConfig(**overrides))
    stage.setup()
    stage._ready = True
    return stage


POST_OFF = dict(merge_clusters=False, reassign_chunks=False, merge_segments=False, split_long=False)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--pyannote", default="", help="a real local pyannote pipeline directory")
    ap.add_argument("--pyannote-random", action="store_true", help="time the pyannote path on random weights")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="", help="write all figures here")
    ap.add_argument("--embedders", default="", help="comma list: print the per-embedder issue-12 table only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(tempfile.gettempdir()) / "kimia-espeak-cache"
    cache.mkdir(exist_ok=True)
    if args.embedders and not args.calibrate:
        res = count_table(args.embedders.split(","), args.quick, cache, args.threads)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1, default=float))
        return
    convs = dataset(args.quick, cache)
    sample = [pyannote_sample()]
    hours = sum(a.size for _, a, _ in convs) / SR
    print(f"{len(convs)} conversations, {hours:.0f} s of audio; pyannote sample 30 s")

    if args.calibrate:
        from stages.diarize.embedders import build_embedder

        from stages.diarize.embedders import CALIBRATION_DIR

        for name in (args.embedders or "resemblyzer").split(","):
            rep = calibrate(convs, sample, build_embedder(name), CALIBRATION_DIR, name)
            print(f"{name} 1.5 s chunk cosines:", json.dumps(rep, indent=1))
        return

    results: dict = {}
    setups = [("offline+resemblyzer", {}, "none")]
    if args.pyannote:
        setups.append(("pyannote", {"backend": "pyannote", "model": args.pyannote}, "none"))
    for name, over, _ in setups:
        for post in (False, True):
            stage = build_stage(**over, **({} if post else POST_OFF))
            label = f"{name} {'+post' if post else 'raw'}"
            results[label] = {"conversations": run(stage, convs), "sample": run(stage, sample)}
    if args.pyannote_random:
        results["pyannote(random weights) rtf"] = time_random_pyannote(sample[0][1][: 10 * SR])

    print()
    hdr = f"{'setup':28s} {'set':14s} {'DER':>6s} {'miss':>6s} {'FA':>6s} {'conf':>6s} {'JER':>6s} {'spkErr':>6s} {'RTF':>7s}"
    print(hdr)
    print("-" * len(hdr))
    for label, res in results.items():
        if not isinstance(res, dict):
            continue
        for setname, r in res.items():
            print(
                f"{label:28s} {setname:14s} {100*r['der']:6.1f} {100*r['miss']:6.1f} {100*r['false_alarm']:6.1f} "
                f"{100*r['confusion']:6.1f} {100*r['jer']:6.1f} {r['spk_err']:6.2f} {r['rtf']:7.4f}"
            )
    if "pyannote(random weights) rtf" in results:
        print(f"pyannote code path on random weights (step 0.5, batch 8): RTF {results['pyannote(random weights) rtf']:.3f}")
    print("\nper conversation, offline raw -> +post (DER / confusion %, speakers found / true):")
    raw = results["offline+resemblyzer raw"]["conversations"]["per_file"]
    post = results["offline+resemblyzer +post"]["conversations"]["per_file"]
    for a, b in zip(raw, post, strict=True):
        print(
            f"  {a['name']:22s} {100*a['der']:5.1f}/{100*a['confusion']:5.1f} -> {100*b['der']:5.1f}/{100*b['confusion']:5.1f}"
            f"   spk {a['hyp_speakers']}->{b['hyp_speakers']} / {a['ref_speakers']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


def time_random_pyannote(audio: np.ndarray) -> float:
    """RTF of the pyannote backend's code path on random weights (see tests for the layout)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_diarize_stage import build_random_pyannote_pipeline

    from stages.diarize.backends import PyannoteBackend

    with tempfile.TemporaryDirectory() as d:
        root = build_random_pyannote_pipeline(Path(d))
        be = PyannoteBackend(str(root), segmentation_step=0.5, embedding_batch_size=8, segmentation_batch_size=8)
        t0 = time.perf_counter()
        be.diarize(audio)
        return (time.perf_counter() - t0) / (audio.size / SR)


if __name__ == "__main__":
    main()
