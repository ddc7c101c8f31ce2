"""Fit the codebooks that ship with kimia-curate (``kimia_model/data/codebooks/``).

The local profile's tokenize stage uses one so that its default output carries semantic tokens
with no manual step (:mod:`kimia_model.shipped_codebooks` installs it into the model cache on
first use). Two are shipped, fitted on the same audio and differing only in how Whisper's
windows are padded: ``whisper-base-1024-trim`` (each segment encoded at its own length, the
local default: a 5 s segment costs a 5 s encoder pass) and ``whisper-base-1024`` (zeros to
30 s, the earlier default, kept so runs that recorded it can still be exported and resumed).
Run this only to refit a shipped file:

    PYTHONPATH=. .venv/bin/python scripts/fit_default_codebook.py [--name whisper-base-1024-trim]

The corpus is everything offline here that is speech, in a fixed order: the bundled
``examples/audio``, the pyannote sample (ships with pyannote.audio), the pytest-audioeval
clips (10 languages), and espeak-ng reading the sentences below in several English voices
and a few other languages. It is a few minutes of audio, most of it synthetic: the result is
a weak tokenizer, useful to exercise the pipeline end to end, not a replacement for
GLM-4-Voice's codebook (which Kimi-Audio uses). The fit is deterministic for a given machine
and seed; another CPU may give slightly different centres, which is why the result is shipped
rather than refitted on every machine.

The codebook is stored as float16 (1 MiB for 1024 x 512); the tokenizer casts it to float32.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kimia_model.codebook import fit_codebook  # noqa: E402
from kimia_model.shipped_codebooks import DATA_DIR, sha256_file  # noqa: E402
from kimia_model.whisper_vq.codebook_file import CODEBOOK_FORMAT, CodebookFile  # noqa: E402

#: Shipped name -> padding it is fitted with.
NAMES = {"whisper-base-1024-trim": "multiple", "whisper-base-1024": "full"}
MODEL = "pkg:whisper-base"
SIZE = 1024
SEED = 0
ITERATIONS = 100

SENTENCES = [
    "Good morning, and welcome to the weekly meeting about the speech data project.",
    "We collected about four hundred hours of recordings from lectures, podcasts and phone calls.",
    "The first step decodes every file, mixes it down to mono and resamples it to sixteen kilohertz.",
    "Then a voice activity detector finds the regions where somebody is actually speaking.",
    "Could you repeat the last number? I think you said three thousand two hundred and seven.",
    "The weather tomorrow will be cloudy in the morning with light rain in the afternoon.",
    "Please transcribe the spoken content into written text and keep the punctuation.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "The quick brown fox jumps over the lazy dog while the cat watches from the window.",
    "How much does the train ticket to the airport cost if I buy it on the platform?",
    "Our model keeps English and Mandarin, and drops samples whose language it cannot tell.",
    "I am not sure that is right; let me check the numbers again before we decide anything.",
    "On the twelfth of March, nineteen ninety nine, the bridge was finally opened to traffic.",
    "Turn left at the second crossing, then walk straight on until you see the old church.",
    "Thank you for calling. All our agents are busy; please stay on the line.",
    "A segment longer than twenty seven seconds is split at the longest pause inside it.",
    "Why do you think the transcripts of noisy recordings contain so many invented words?",
    "Whisper, tokens, codebooks and shards: every stage writes what it did into provenance.",
    "Seven, eight, nine, ten. Eleven, twelve. Thirteen fourteen fifteen sixteen.",
    "Yes. No. Maybe. Absolutely not! Well, all right then, if you really insist.",
]
VOICES = ["en-us", "en+f3", "en+m7", "en-gb+f2", "en-us+f4", "en+m3"]
OTHER = [("de", "Guten Morgen, wie geht es Ihnen heute? Das Wetter ist schön."),
         ("fr", "Bonjour à tous, nous allons parler de la collecte de données vocales."),
         ("es", "Buenos días, hoy hablamos de cómo preparar datos de voz para entrenar modelos."),
         ("cmn", "你好，今天我们讨论语音数据的收集和整理。")]


def _pkg_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{module} is not installed (pip install -e '.[test]')")
    return Path(next(iter(spec.submodule_search_locations)))


def _espeak(work: Path) -> list[Path]:
    """One ~20 s file per voice: the sentences in turn, so Whisper's 30 s windows are mostly speech."""
    import soundfile as sf

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit("espeak-ng is not installed (apt-get install espeak-ng)")
    files = []
    for v, voice in enumerate(VOICES):
        parts = [SENTENCES[(v * 3 + k) % len(SENTENCES)] for k in range(len(SENTENCES))]
        chunk: list[np.ndarray] = []
        for i, text in enumerate(parts):
            wav = work / f"{voice}-{i}.wav"
            subprocess.run([exe, "-v", voice, "-s", str(150 + 10 * (v % 3)), "-w", str(wav), text],
                           check=True, capture_output=True)
            a, sr = sf.read(wav, dtype="float32")
            chunk += [a, np.zeros(int(0.4 * sr), np.float32)]
            if sum(len(c) for c in chunk) > 20 * sr or i == len(parts) - 1:
                out = work / f"espeak-{voice}-{len(files):03d}.wav"
                sf.write(out, np.concatenate(chunk), sr)
                files.append(out)
                chunk = []
    for lang, text in OTHER:
        out = work / f"espeak-{lang}.wav"
        subprocess.run([exe, "-v", lang, "-w", str(out), text], check=True, capture_output=True)
        files.append(out)
    return files


def corpus(work: Path) -> list[Path]:
    """The fitting audio, in a fixed order (see the module docstring)."""
    import soundfile as sf

    files: list[Path] = []
    for p in sorted((ROOT / "examples" / "audio").iterdir()):
        try:
            sf.info(str(p))
        except Exception:  # noqa: BLE001 - the bundled examples include broken files on purpose
            continue
        if p.suffix.lower() in (".wav", ".flac", ".ogg"):
            files.append(p)
    files.append(_pkg_dir("pyannote.audio") / "sample" / "sample.wav")
    files += sorted((_pkg_dir("pytest_audioeval") / "samples" / "audio").rglob("*.wav"))
    return files + _espeak(work)


def _describe(f: Path, work: Path) -> str:
    """A file of the corpus as ``repo-path``, ``package:path`` or ``espeak-ng:name``."""
    if f.parent == work:
        return f"espeak-ng:{f.name}"
    for module in ("pyannote.audio", "pytest_audioeval"):  # before ROOT: a venv may live inside it
        base = _pkg_dir(module)
        if f.is_relative_to(base):
            return f"{module}:{f.relative_to(base)}"
    if f.is_relative_to(ROOT):
        return str(f.relative_to(ROOT))
    return f.name


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", choices=sorted(NAMES), default="whisper-base-1024-trim", help="which shipped codebook to refit")
    name = ap.parse_args().name
    padding = NAMES[name]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = corpus(work)
        fitted = work / "fit.safetensors"
        report = fit_codebook(files, fitted, MODEL, SIZE, iterations=ITERATIONS, seed=SEED, use_ray=False,
                              max_samples=500_000, padding=padding)
        book = CodebookFile.load(fitted)
    from safetensors.numpy import save_file

    DATA_DIR.mkdir(parents=True, exist_ok=True)
    out = DATA_DIR / f"{name}.safetensors"
    meta = {k: v for k, v in book.meta.items() if k != "path"}
    meta.update(format=CODEBOOK_FORMAT, whisper_model=MODEL, pooling_type=book.pooling_type, padding=padding)
    save_file({"codebook": book.codebook.astype(np.float16)}, str(out), metadata=meta)
    names = [_describe(f, work) for f in files]
    prov = {
        "name": name,
        "how": f"mini-batch k-means (k-means++ seeding, seed {SEED}, {ITERATIONS} iterations) on pooled "
               f"12.5 Hz Whisper-base encoder features (last layer, windows padded: {padding}), stored as float16",
        "padding": padding,
        "script": "scripts/fit_default_codebook.py",
        "model": MODEL,
        "size": SIZE,
        "from": names,
        "hours": report["hours"],
        "vectors": report["vectors"],
        "usage": report["usage"],
        "perplexity": report["perplexity"],
        "inertia": report["inertia"],
        "fit_seconds": round(time.perf_counter() - t0, 1),
        "note": "a weak tokenizer for testing the pipeline: k-means on a few minutes of mostly synthetic "
                "speech; Kimi-Audio uses GLM-4-Voice's codebook (configs/kimi_audio.yaml)",
        "sha256": sha256_file(out),
    }
    (DATA_DIR / f"{name}.json").write_text(json.dumps(prov, indent=2) + "\n")
    print(json.dumps({k: v for k, v in prov.items() if k != "from"}, indent=2))


if __name__ == "__main__":
    main()
