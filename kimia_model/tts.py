"""Text-to-speech backends behind one interface: ``synthesize(text, voice) -> (audio, sample_rate)``.

* ``espeak-ng``: Debian's formant synthesiser (``/usr/bin/espeak-ng``), run as a subprocess that
  writes a WAV to stdout. Robotic but real, intelligible speech in many voices and languages,
  available offline: the round-trip check and the synthetic-speech workflow work with it today.
* ``kimia``: Kimi-Audio's own path, text -> LM audio tokens -> detokenizer -> 24 kHz. The LM is
  injected as a callable (``generate(text, voice) -> semantic token ids``) so this module does not
  depend on how generation is wired. The lead wires it to ``kimia_model.kimia_generate`` (the
  Kimi-Audio LM helper's module): a callable that prompts the LM to speak ``text`` with
  ``output="both"`` and returns the generated audio-stream ids minus the audio offset (152064),
  blanks and control ids removed (upstream ``KimiAudio.generate`` does this filtering before it
  calls ``detokenize_audio``).

Upstream Kimi-Audio speaks with one voice only (its detokenizer is trained on one speaker and
never prefilled with a prompt), so the ``kimia`` backend accepts the single voice ``"kimia"``.

Example:
    >>> audio, sr = EspeakTTS().synthesize("Hello there.", "en-us")
    >>> sr, audio.dtype.name, audio.size > sr // 4
    (22050, 'float32', True)
"""

from __future__ import annotations

import functools
import re
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

ESPEAK_BINARY = "/usr/bin/espeak-ng"
#: espeak-ng voice names are language codes with optional variant ("en-gb+f2"); nothing else
#: reaches the command line.
_VOICE_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}(\+[A-Za-z0-9_-]{1,20})?$")
MAX_TEXT_CHARS = 2000


class TTSError(RuntimeError):
    """Text that cannot be spoken (empty, too long, unknown voice, synthesiser failure).

    A property of the text, not of the machine: the round-trip stage and the synthesis
    workflow catch it and drop the sample with ``roundtrip_tts_failed``. It derives from
    ``RuntimeError`` as the stages' ``StageError`` does, but not from it: model code does
    not import the stages.
    """


class TTSBackend(Protocol):
    """What every TTS backend offers."""

    name: str
    default_voice: str

    def synthesize(self, text: str, voice: str | None = None) -> tuple[np.ndarray, int]:
        """Speak ``text`` with ``voice``: float32 mono audio in [-1, 1] and its sample rate."""
        ...


def _check_text(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise TTSError("nothing to synthesize: empty text")
    if len(text) > MAX_TEXT_CHARS:
        raise TTSError(f"text too long to synthesize ({len(text)} > {MAX_TEXT_CHARS} characters)")
    return text.strip()


def parse_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """Decode 16-bit PCM WAV bytes that may come from a pipe.

    espeak-ng streaming to stdout cannot seek back to fill in the RIFF and data sizes, so it
    writes placeholders (0x7ffff000...); soundfile rejects that, so the chunks are walked by
    hand and the data chunk is taken to run to the end of the bytes.
    """
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise TTSError("synthesiser did not return a WAV stream")
    pos, sr, channels, bits = 12, None, 1, 16
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = pos + 8
        if cid == b"fmt ":
            fmt, channels, sr = struct.unpack("<HHI", data[body:body + 8])
            bits = struct.unpack("<H", data[body + 14:body + 16])[0]
            if fmt != 1 or bits != 16:
                raise TTSError(f"unsupported WAV format {fmt} / {bits} bits")
        elif cid == b"data":
            if sr is None:
                raise TTSError("WAV data before its fmt chunk")
            pcm = data[body:]
            pcm = pcm[: len(pcm) - len(pcm) % (2 * channels)]
            audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
            if channels > 1:
                audio = audio.reshape(-1, channels).mean(axis=1)
            return audio, int(sr)
        pos = body + size + (size & 1)
    raise TTSError("WAV stream has no data chunk")


class EspeakTTS:
    """espeak-ng through a subprocess (text on stdin, WAV on stdout).

    Args:
        binary: the espeak-ng executable.
        rate_wpm: speaking rate in words per minute (espeak-ng's ``-s``; its default is 175).
        timeout_s: kill the synthesiser after this long (a pathological input must not hang a worker).
    """

    name = "espeak-ng"
    default_voice = "en-us"

    def __init__(self, binary: str = ESPEAK_BINARY, rate_wpm: int = 160, timeout_s: float = 30.0) -> None:
        path = shutil.which(binary) or (binary if Path(binary).is_file() else None)
        if path is None:
            raise FileNotFoundError(f"espeak-ng not found at {binary}: install the Debian package espeak-ng")
        self.binary, self.rate_wpm, self.timeout_s = path, int(rate_wpm), float(timeout_s)

    @functools.cached_property
    def variants(self) -> frozenset[str]:
        """Voice variant names (the part after '+'), from ``espeak-ng --voices=variant``."""
        proc = subprocess.run([self.binary, "--voices=variant"], capture_output=True, timeout=self.timeout_s,
                              check=False)
        names = set()
        for line in proc.stdout.decode("utf-8", "replace").splitlines()[1:]:
            for field_ in line.split():
                if field_.startswith("!v/"):
                    names.add(field_[3:])
        return frozenset(names)

    def synthesize(self, text: str, voice: str | None = None) -> tuple[np.ndarray, int]:
        text = _check_text(text)
        voice = voice or self.default_voice
        if not _VOICE_RE.match(voice):
            raise TTSError(f"invalid espeak-ng voice name {voice!r} (expected e.g. en-us, en+f3, en-gb+f2)")
        # espeak-ng silently ignores an unknown variant and speaks the default voice instead.
        if "+" in voice and self.variants and voice.split("+", 1)[1] not in self.variants:
            raise TTSError(f"unknown espeak-ng voice variant in {voice!r} (see espeak-ng --voices=variant)")
        try:
            proc = subprocess.run(
                [self.binary, "-v", voice, "-s", str(self.rate_wpm), "--stdin", "--stdout"],
                input=text.encode("utf-8"), capture_output=True, timeout=self.timeout_s, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TTSError(f"espeak-ng timed out after {self.timeout_s:.0f} s") from exc
        err = proc.stderr.decode("utf-8", "replace")
        # An unknown variant ("en+nope") still yields default-voice audio with exit 0; only
        # stderr tells, and a wrong voice must not silently become another one.
        if proc.returncode != 0 or not proc.stdout or "Error:" in err:
            msg = err.strip().splitlines()
            raise TTSError(f"espeak-ng failed for voice {voice!r}: {msg[-1] if msg else f'exit {proc.returncode}'}")
        audio, sr = parse_wav_bytes(proc.stdout)
        if audio.size == 0:
            raise TTSError(f"espeak-ng produced no audio for {text[:40]!r}")
        return audio, sr


#: The LM callable the ``kimia`` backend needs: (text, voice) -> semantic token ids (unshifted).
TokenGenerator = Callable[[str, str], Iterable[int]]


class KimiaTTS:
    """Kimi-Audio TTS: an injected LM token generator followed by the streaming detokenizer.

    Args:
        generate: ``(text, voice) -> iterable of semantic ids in [0, 16384)``. An iterator is
            consumed lazily, so audio chunks can be produced while the LM is still generating.
        detokenizer: a :class:`kimia_model.detokenizer.Detokenizer`.
        seed: flow-matching noise seed (same seed, same audio).
    """

    name = "kimia"
    default_voice = "kimia"

    def __init__(self, generate: TokenGenerator, detokenizer: object, seed: int = 0) -> None:
        self.generate = generate
        self.detokenizer = detokenizer
        self.seed = seed

    def _tokens(self, text: str, voice: str | None) -> Iterable[int]:
        text = _check_text(text)
        voice = voice or self.default_voice
        if voice != self.default_voice:
            raise TTSError(f"the kimia TTS backend has one voice ('kimia'), got {voice!r}")
        return self.generate(text, voice)

    def stream(self, text: str, voice: str | None = None) -> Iterator[np.ndarray]:
        """Yield 24 kHz waveform pieces as the LM's tokens arrive."""
        yield from self.detokenizer.stream(self._tokens(text, voice), seed=self.seed)  # type: ignore[attr-defined]

    def synthesize(self, text: str, voice: str | None = None) -> tuple[np.ndarray, int]:
        try:
            pieces = list(self.stream(text, voice))
        except ValueError as exc:  # e.g. the LM produced no audio tokens
            raise TTSError(f"kimia TTS failed: {exc}") from exc
        return np.concatenate(pieces).astype(np.float32), int(self.detokenizer.sample_rate)  # type: ignore[attr-defined]


def build_tts(backend: str, *, generate: TokenGenerator | None = None, detokenizer: object | None = None,
              espeak_binary: str = ESPEAK_BINARY, rate_wpm: int = 160, seed: int = 0) -> TTSBackend:
    """Construct a backend by name (``espeak-ng`` or ``kimia``)."""
    if backend == "espeak-ng":
        return EspeakTTS(espeak_binary, rate_wpm)
    if backend == "kimia":
        if generate is None or detokenizer is None:
            raise ValueError(
                "the kimia TTS backend needs an LM token generator and a detokenizer "
                "(wire kimia_model.kimia_generate and Detokenizer.from_pretrained)"
            )
        return KimiaTTS(generate, detokenizer, seed)
    raise ValueError(f"unknown TTS backend {backend!r} (espeak-ng, kimia)")
