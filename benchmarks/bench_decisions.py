"""Curation decisions on easy data, beside faster-whisper's batched pipeline on the same weights.

Generates its own corpus with espeak-ng (cached under ``benchmarks/_work``): conversations of
2-4 voices, 60-150 s, turns of known text and speaker separated by pauses, and solo clips of
one voice, 5-120 s. Runs the local profile (``kimia-curate run --config configs/local.yaml``,
keeping dropped segments for scoring) as a user would, and faster-whisper's
``BatchedInferencePipeline`` (Silero VAD, batch 8, beam 5) on the same Whisper weights, then
prints:

* WER over all segments (kept and dropped; a segment the audio checks dropped before
  transcription, ``transcribe.kept_only``, has no label, and its turns leave the reference) and
  over kept segments only, and the peer's WER;
* DER (pyannote.metrics, collar 0.25 s) on the conversations and on pyannote's sample;
* the exact speaker-count rate, and whether solo clips came out as one speaker;
* segments dropped for language (every input is English);
* the round-trip check's separation of right from wrong labels (``benchmarks/bench_roundtrip.py``'s
  set: espeak-ng sentences and human clips, each with its right label and four wrong ones).

Usage::

    python benchmarks/bench_decisions.py            # 8 conversations + 4 solo clips (~13 min audio)
    python benchmarks/bench_decisions.py --quick    # 6 conversations + 3 solo clips, shorter
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_diarization import SENTENCES, VOICES, pyannote_sample, tts  # noqa: E402
from corpus import WORK, turns_outside  # noqa: E402

from stages.diarize.evaluate import score as der_score  # noqa: E402
from stages.textnorm import corpus_wer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SR = 16000
Turn = tuple[float, float, str, str]  # start, end, speaker, text


def make_recording(seed: int, n_voices: int, seconds: float, cache: Path) -> tuple[np.ndarray, list[Turn]]:
    """Turns of whole sentences by ``n_voices`` voices, pauses 0.4-1.5 s, no overlap."""
    rng = np.random.default_rng(seed)
    voices = [VOICES[i] for i in rng.permutation(len(VOICES))[:n_voices]]
    pieces: list[np.ndarray] = [np.zeros(int(0.5 * SR), np.float32)]
    turns: list[Turn] = []
    t, prev = 0.5, -1
    while t < seconds:
        spk = int(rng.integers(n_voices))
        if n_voices > 1 and spk == prev and rng.random() > 0.15:
            spk = (spk + 1) % n_voices
        sentences = [SENTENCES[int(rng.integers(len(SENTENCES)))] for _ in range(1 if rng.random() < 0.8 else 2)]
        speech = np.concatenate(
            [np.concatenate([tts(s, voices[spk], cache), np.zeros(int(0.25 * SR), np.float32)]) for s in sentences]
        )[: -int(0.25 * SR)]
        speech = speech * rng.uniform(0.5, 1.0)
        turns.append((t, t + speech.size / SR, f"spk{spk}", " ".join(sentences)))
        pause = rng.uniform(0.4, 1.5)
        pieces += [speech, np.zeros(int(pause * SR), np.float32)]
        t += speech.size / SR + pause
        prev = spk
    audio = np.concatenate(pieces)
    return (audio / max(1.0, float(np.abs(audio).max()) / 0.95)).astype(np.float32), turns


def corpus(quick: bool) -> tuple[Path, dict[str, list[Turn]]]:
    """The generated files and their reference turns (cached)."""
    folder = WORK / ("decisions-quick" if quick else "decisions")
    meta_path = folder / "reference.json"
    if meta_path.is_file():
        return folder, {k: [tuple(t) for t in v] for k, v in json.loads(meta_path.read_text()).items()}
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is needed: apt-get install espeak-ng")
    folder.mkdir(parents=True, exist_ok=True)
    cache = WORK / "tts-cache"
    cache.mkdir(parents=True, exist_ok=True)
    plan = [(2, 60), (3, 90), (4, 120), (2, 150), (3, 75), (4, 100)]
    if not quick:
        plan += [(2, 110), (3, 140)]
    solos = [10, 25, 60] if quick else [10, 25, 60, 110]
    refs: dict[str, list[Turn]] = {}
    for i, (voices, seconds) in enumerate(plan):
        audio, turns = make_recording(100 + i, voices, seconds * (0.5 if quick else 1.0), cache)
        sf.write(folder / f"conv{i:02d}_v{voices}.wav", audio, SR)
        refs[f"conv{i:02d}_v{voices}.wav"] = turns
    for i, seconds in enumerate(solos):
        audio, turns = make_recording(200 + i, 1, seconds, cache)
        sf.write(folder / f"solo{i:02d}.wav", audio, SR)
        refs[f"solo{i:02d}.wav"] = turns
    meta_path.write_text(json.dumps(refs))
    return folder, refs


def run_local(folder: Path, out: Path, sets: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, list[dict]], float]:
    """The local profile as a user runs it (plus ``sets`` overrides); every segment (kept and
    dropped) per file name."""
    import pyarrow.parquet as pq

    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--config", str(ROOT / "configs" / "local.yaml"),
           "--input", str(folder), "--output", str(out), "--quiet", "--set", "filter.keep_dropped=true"]  # fmt: skip
    for override in sets:
        cmd += ["--set", override]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    rows: dict[str, list[dict]] = {}
    for root in (out, out / "dropped"):
        for p in sorted((root / "index").glob("*.parquet")):
            for r in pq.read_table(p).to_pylist():
                rows.setdefault(Path(r["source"].removeprefix("file://")).name, []).append(r)
    for v in rows.values():
        v.sort(key=lambda r: r["start_s"])
    return rows, wall


def run_peer(folder: Path, names: list[str]) -> tuple[dict[str, str], float]:
    """faster-whisper's BatchedInferencePipeline on the weights the local profile uses."""
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    from stages.base import StageContext
    from stages.transcribe import TranscribeConfig, resolve_asr_model

    path = resolve_asr_model(TranscribeConfig(model="pkg:whisper-base"), StageContext())
    t0 = time.perf_counter()
    pipe = BatchedInferencePipeline(WhisperModel(str(path), device="cpu", compute_type="int8"))
    texts = {}
    for name in names:
        audio, _ = sf.read(folder / name, dtype="float32")
        segments, _info = pipe.transcribe(audio, batch_size=8, beam_size=5)
        texts[name] = " ".join(s.text.strip() for s in segments)
    return texts, time.perf_counter() - t0


def kept_reference(turns: list[Turn], start: float, end: float) -> str:
    """The reference text of the turns whose middle falls inside a segment."""
    return " ".join(text for a, b, _, text in turns if start - 0.25 <= (a + b) / 2 <= end + 0.25)


def roundtrip_separation(voices: int) -> dict:
    """The round-trip check's default verdict on right and wrong labels of real speech."""
    from bench_roundtrip import espeak_clips, human_clips, separation

    from stages.base import StageContext
    from stages.roundtrip import RoundtripConfig, RoundtripStage

    clips = espeak_clips(voices, 0) + human_clips()
    stage = RoundtripStage(RoundtripConfig(asr={"model": "pkg:whisper-base", "language": "en", "beam_size": 1}),
                           StageContext())  # fmt: skip
    stage.check()
    stage.setup()
    return separation(stage, clips, 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="6 shorter conversations and 3 solo clips")
    ap.add_argument("--no-peer", action="store_true", help="skip faster-whisper's batched pipeline")
    ap.add_argument("--no-roundtrip", action="store_true", help="skip the round-trip separation")
    ap.add_argument("--rt-voices", type=int, default=2, help="espeak-ng voices per sentence in the round-trip set")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override for the local runs")
    ap.add_argument("--out", type=Path, default=None, help="keep the corpus run's output here (default: a temp dir)")
    args = ap.parse_args()

    folder, refs = corpus(args.quick)
    names = sorted(refs)
    audio_s = sum(sf.info(folder / n).duration for n in names)
    print(f"corpus: {len(names)} files, {audio_s / 60:.1f} min of audio ({folder})")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "out"
        shutil.rmtree(out, ignore_errors=True)
        rows, wall = run_local(folder, out, args.sets)
    print(f"local profile: {wall:.1f} s wall, real-time factor {wall / audio_s:.3f}")

    all_ref, all_hyp, kept_ref, kept_hyp = [], [], [], []
    ders, exact, lang_drops, n_segments, solo_one, untranscribed = [], [], 0, 0, [], 0
    print(f"{'file':16} {'voices':>6} {'found':>5} {'DER':>6} {'segments':>8} {'kept':>5} {'lang drops':>10}")
    for name in names:
        turns, segs = refs[name], rows.get(name, [])
        # Segments the audio checks dropped before transcription (transcribe.kept_only) have no
        # text: their turns leave the reference instead of counting as deleted words.
        skipped = [(r["start_s"], r["end_s"]) for r in segs if r.get("text") is None]
        untranscribed += len(skipped)
        all_ref.append(" ".join(t[3] for t in turns_outside(turns, skipped)))
        all_hyp.append(" ".join(r["text"] for r in segs if r.get("text") is not None))
        kept = [r for r in segs if r.get("verdict") != "drop"]
        for r in kept:
            kept_ref.append(kept_reference(turns, r["start_s"], r["end_s"]))
            kept_hyp.append(r.get("text") or "")
        drops = sum(
            1 for r in segs if {"language_not_allowed", "low_language_prob"} & set(r.get("drop_reasons") or [])
        )
        lang_drops += drops
        n_segments += len(segs)
        voices = len({t[2] for t in turns})
        found = len({r.get("speaker") for r in segs if r.get("speaker") is not None})
        d = der_score([(a, b, s) for a, b, s, _ in turns], [(r["start_s"], r["end_s"], str(r["speaker"])) for r in segs])
        if name.startswith("conv"):
            ders.append(d["der"])
            exact.append(found == voices)
        else:
            solo_one.append(found == 1)
        print(f"{name:16} {voices:6d} {found:5d} {d['der']:6.3f} {len(segs):8d} {len(kept):5d} {drops:10d}")

    print()
    print(f"WER, all segments (kept and dropped): {corpus_wer(all_ref, all_hyp):.3f}"
          + (f" (over the turns transcribed: {untranscribed} segments were dropped for their audio first)"
             if untranscribed else ""))
    print(f"WER, kept segments:                   {corpus_wer(kept_ref, kept_hyp):.3f} ({len(kept_hyp)} segments)")
    if not args.no_peer:
        peer, peer_wall = run_peer(folder, names)
        print(f"WER, faster-whisper BatchedInferencePipeline, same weights: "
              f"{corpus_wer(all_ref, [peer[n] for n in names]):.3f} ({peer_wall:.1f} s)")  # fmt: skip
    print(f"DER, generated conversations (collar 0.25 s): mean {np.mean(ders):.3f}, worst {max(ders):.3f}")
    name, audio, ref = pyannote_sample()
    with tempfile.TemporaryDirectory() as tmp:
        sf.write(Path(tmp) / "sample.wav", audio, SR)
        sample_rows, _ = run_local(Path(tmp), Path(tmp) / "out", args.sets)
    segs = sample_rows.get("sample.wav", [])
    d = der_score(ref, [(r["start_s"], r["end_s"], str(r["speaker"])) for r in segs])
    print(f"DER, pyannote sample: {d['der']:.3f} ({d['hyp_speakers']} speakers found, 2 in the reference)")
    print(f"speaker count exact: {sum(exact)}/{len(exact)} conversations; solo clips one speaker: "
          f"{sum(solo_one)}/{len(solo_one)}")  # fmt: skip
    print(f"dropped for language (all input English): {lang_drops}/{n_segments} = {lang_drops / max(1, n_segments):.1%}")
    if not args.no_roundtrip:
        sep = roundtrip_separation(args.rt_voices)
        kinds = ", ".join(f"{k} {v:.0%}" for k, v in sep["drop_rate"].items())
        print(f"round-trip (mode forced): keeps {sep['keep_rate']:.1%} of {sep['n_correct']} correct labels, "
              f"drops {sep['drop_rate_all']:.1%} of {sep['n_wrong']} wrong ones ({kinds})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
