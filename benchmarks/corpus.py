"""Generated speech corpora for benchmarks: espeak-ng voices, known text, pauses.

Deterministic for a given seed, cached under ``benchmarks/_work``, so repeated benchmark
runs measure the pipeline and not the synthesizer.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

WORK = Path(__file__).resolve().parent / "_work"

VOICES = ["en-us", "en+f3", "en+m7", "en-gb+f2", "en-us+m3", "en+f4"]

SENTENCES = [
    "The committee will meet again next week to review the budget for the coming year.",
    "Please make sure that every file is backed up before the system is updated tonight.",
    "Our team collected more than three thousand hours of speech from public radio programs.",
    "The weather forecast says it will rain in the morning and clear up by the afternoon.",
    "She explained the results slowly so that everyone in the room could follow the argument.",
    "A good data pipeline keeps the original recording next to every processed version.",
    "The train to the city leaves at half past eight and arrives just before ten.",
    "He asked whether the new model could understand speakers with strong regional accents.",
    "We measured the error rate on a held out set that nobody had listened to before.",
    "The library will be closed on Monday because of the national holiday.",
    "Each segment is labelled by a recognizer and checked again by a second system.",
    "They planted tomatoes, beans and a row of sunflowers along the garden fence.",
    "If the signal is too noisy, the segment is dropped and the reason is written down.",
    "The museum opened a new exhibition about the history of early recording machines.",
    "Most of the questions were about the schedule, the price and the size of the groups.",
    "Long recordings are cut into shorter pieces of at most twenty seven seconds.",
    "The children read a story about a fox who wanted to learn how to fly.",
    "When the network fails, the job can be started again without losing finished work.",
    "The doctor recommended plenty of water, some rest and a short walk every day.",
    "Tokens are produced at twelve and a half per second for every second of audio.",
]


def turns_outside(turns: list, spans: list[tuple[float, float]]) -> list:
    """The turns ``(start, end, ...)`` whose midpoint lies in none of ``spans`` (``(start, end)``
    seconds): the reference left for a run that did not transcribe those spans (segments its
    audio checks dropped first, ``transcribe.kept_only``).

    >>> turns_outside([(0.0, 2.0, "v", "one"), (2.5, 4.0, "v", "two")], [(2.4, 4.1)])
    [(0.0, 2.0, 'v', 'one')]
    """
    return [t for t in turns if not any(a <= (t[0] + t[1]) / 2 < b for a, b in spans)]


def _say(text: str, voice: str, path: Path, speed: int) -> np.ndarray:
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True, capture_output=True)
    audio, _ = sf.read(path, dtype="float32")
    return audio


def make_corpus(minutes: float = 10.0, seed: int = 0, name: str | None = None) -> tuple[Path, list[dict]]:
    """Recordings of 2-3 alternating voices, 15-40 s each, totalling about ``minutes`` of audio.

    Returns the folder and, per recording, its turns ``{"file", "turns": [(start, end, voice, text)]}``.
    """
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is needed: apt-get install espeak-ng")
    folder = WORK / (name or f"corpus-{minutes:g}min-{seed}")
    meta_path = folder / "corpus.json"
    if meta_path.is_file():
        return folder, json.loads(meta_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sr = 22050
    total = 0.0
    meta: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        i = 0
        while total < minutes * 60:
            voices = rng.sample(VOICES, rng.choice([2, 3]))
            pieces: list[np.ndarray] = []
            turns = []
            t = 0.0
            length = rng.uniform(15, 40)
            while t < length:
                voice = voices[len(turns) % len(voices)]
                text = rng.choice(SENTENCES)
                a = _say(text, voice, Path(tmp) / "s.wav", rng.randint(140, 175))
                turns.append((t, t + len(a) / sr, voice, text))
                pause = rng.uniform(0.3, 1.5)
                pieces += [a, np.zeros(int(pause * sr), np.float32)]
                t += len(a) / sr + pause
            audio = np.concatenate(pieces)
            name_i = f"rec{i:04d}.wav"
            sf.write(folder / name_i, audio, sr)
            meta.append({"file": name_i, "turns": turns})
            total += len(audio) / sr
            i += 1
    meta_path.write_text(json.dumps(meta))
    return folder, meta


def parse_seeds(spec: str) -> list[int]:
    """Seeds from ``13-22`` or ``13,15,17`` (or both: ``13-15,20``).

    >>> parse_seeds("13-15,20"), parse_seeds("13")
    ([13, 14, 15, 20], [13])
    """
    seeds: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        seeds += range(int(lo), int(hi or lo) + 1)
    return seeds


def joined_corpus(minutes: float, seeds: list[int]) -> tuple[Path, list[dict]]:
    """One corpus made of several seeds' corpora of ``minutes`` each: a longer run to measure.

    The files are hard links (copies across file systems) named ``s<seed>_<file>``, not
    symlinks: kimia-curate records a symlink's target as the source, whose name repeats
    between seeds. A single seed is its own corpus.

    Returns the folder and the turns of every file, as :func:`make_corpus`.
    """
    if len(seeds) == 1:
        return make_corpus(minutes=minutes, seed=seeds[0], name=f"speed-{minutes:g}min-{seeds[0]}")
    folder = WORK / f"speed-{minutes:g}min-{'_'.join(map(str, seeds))}"
    meta_path = folder / "corpus.json"
    if meta_path.is_file():
        return folder, json.loads(meta_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    meta: list[dict] = []
    for seed in seeds:
        part, part_meta = joined_corpus(minutes, [seed])
        for rec in part_meta:
            name = f"s{seed}_{rec['file']}"
            target = folder / name
            if not target.exists():
                try:
                    os.link(part / rec["file"], target)
                except OSError:
                    shutil.copyfile(part / rec["file"], target)
            meta.append({**rec, "file": name})
    meta_path.write_text(json.dumps(meta))
    return folder, meta
