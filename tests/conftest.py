"""Shared fixtures: real speech that ships with installed packages or is spoken by espeak-ng.

Nothing here downloads anything: the pyannote sample and the pytest-audioeval clips come
with their pip packages, espeak-ng is a Debian package, and Whisper weights come from the
packaged CTranslate2 models.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ROOT = Path(__file__).resolve().parent.parent


def _pkg_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.submodule_search_locations, f"{module} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def pyannote_sample() -> Path:
    """30 s, 2 speakers, with sample.rttm and sample.stm beside it."""
    return _pkg_dir("pyannote.audio") / "sample" / "sample.wav"


@pytest.fixture(scope="session")
def audioeval_dir() -> Path:
    return _pkg_dir("pytest_audioeval") / "samples" / "audio"


@pytest.fixture(scope="session")
def english_clips(audioeval_dir: Path) -> list[tuple[Path, str]]:
    """The English pytest-audioeval clips with their exact transcripts."""
    return [(p, p.with_suffix(".txt").read_text().strip()) for p in sorted((audioeval_dir / "en").glob("*.wav"))]


def espeak(text: str, path: Path, voice: str = "en-us", speed: int = 160) -> Path:
    """Speak ``text`` with espeak-ng into a wav file (22.05 kHz mono)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def espeak_conversation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two voices taking turns with pauses: a small real multi-speaker recording."""
    d = tmp_path_factory.mktemp("espeak")
    parts = [
        ("en-us", "Good morning. Today we talk about collecting speech data for training."),
        ("en+f3", "That sounds interesting. How do you check the transcripts for mistakes?"),
        ("en-us", "We compare them with a second recognizer and keep the ones that agree."),
    ]
    audio = []
    sr = 22050
    for i, (voice, text) in enumerate(parts):
        a, sr = sf.read(espeak(text, d / f"p{i}.wav", voice), dtype="float32")
        audio += [a, np.zeros(int(0.8 * sr), np.float32)]
    out = d / "conversation.wav"
    sf.write(out, np.concatenate(audio), sr)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for all tests that need it (start-up costs ~5 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never attach to a cluster that happens to run on this machine
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
    yield ray
    ray.shutdown()
