"""EnhanceStage: both backends, alignment, lengths, errors, quarantine (CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from kimia_model.bsrnn import BSRNN, BSRNNConfig, CheckpointError, SampleRateError, save_checkpoint
from kimia_model.bsrnn_train import si_sdr
from kimia_model.refs import ModelNotFoundError
from stages.enhance import DeviceUnavailableError, EnhanceConfig, EnhanceStage

TINY = dict(feature_dim=8, hidden_dim=8, num_layers=1, band_scheme=((4000.0, 1000.0), (24000.0, 10000.0)))


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _row(audio: np.ndarray, sr: int, rid: str = "r0") -> dict:
    return {"recording_id": rid, "source": f"/x/{rid}.wav", "status": "ok", "sample_rate": sr,
            "duration_s": audio.shape[0] / sr, "audio": audio}


@pytest.fixture(scope="module")
def speech16k(pyannote_sample: Path) -> np.ndarray:
    x, sr = sf.read(pyannote_sample, dtype="float32")
    assert sr == 16000
    return x[int(6.5 * sr) : int(10.5 * sr)]  # 4 s where both speakers talk


def _lag(y: np.ndarray, x: np.ndarray) -> int:
    """Lag (samples) of y relative to x at the cross-correlation peak."""
    n = x.shape[0]
    xc = np.fft.irfft(np.fft.rfft(y, 2 * n) * np.conj(np.fft.rfft(x, 2 * n)))
    lag = int(np.argmax(xc))
    return lag if lag < n else lag - 2 * n


def _white_at(x: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    n = np.random.default_rng(seed).standard_normal(x.shape[0]).astype(np.float32)
    n *= np.sqrt(np.mean(x**2) / np.mean(n**2) / 10 ** (snr_db / 10))
    return (x + n).astype(np.float32)


def _identity_checkpoint(path: Path, **kw: object) -> Path:
    """A BSRNN whose masks are exactly 1: the stage's output must equal its input."""
    torch.manual_seed(0)
    model = BSRNN(BSRNNConfig(**{**TINY, **kw}))
    with torch.no_grad():
        for (lo, hi), fc in zip(model.bands, model.mask.fc2):
            fc.weight.zero_()
            fc.bias[: 2 * (hi - lo)] = torch.tensor([1.0, 0.0]).repeat(hi - lo)
            fc.bias[2 * (hi - lo) :] = 40.0
    return save_checkpoint(model, path)


# -- DeepFilterNet3 (packaged) ------------------------------------------------------------


@pytest.fixture(scope="module")
def dfn_stage() -> EnhanceStage:
    stage = EnhanceStage(EnhanceConfig(backend="deepfilternet3"))
    stage.check()
    return stage


def test_dfn3_denoises_and_keeps_alignment(dfn_stage: EnhanceStage, speech16k: np.ndarray) -> None:
    noisy = _white_at(speech16k, 0.0)
    out = dfn_stage([_row(noisy, 16000)])[0]
    y = out["audio_enhanced"]
    assert out["audio"] is noisy  # the original stays beside the enhanced stream
    assert y.shape == noisy.shape and y.dtype == np.float32
    assert _lag(y, speech16k) == 0
    gain = float(si_sdr(torch.from_numpy(y), torch.from_numpy(speech16k)) - si_sdr(torch.from_numpy(noisy), torch.from_numpy(speech16k)))
    assert gain > 5.0, gain
    assert out["provenance"]["enhance"]["model"].startswith("pkg:deepfilternet3@")


@pytest.mark.parametrize("sr,n", [(44100, 44100 + 17), (48000, 7), (22050, 22050)])
def test_dfn3_output_length_equals_input_at_any_rate(dfn_stage: EnhanceStage, sr: int, n: int) -> None:
    x = (np.random.default_rng(1).standard_normal(n) * 0.05).astype(np.float32)
    y = dfn_stage([_row(x, sr)])[0]["audio_enhanced"]
    assert y.shape == (n,)


def test_dfn3_is_independent_of_batch_history(dfn_stage: EnhanceStage, speech16k: np.ndarray) -> None:
    """A fresh runtime per recording: the same input gives the same output after other rows."""
    a = _white_at(speech16k[:16000], 5.0)
    first = dfn_stage([_row(a, 16000)])[0]["audio_enhanced"]
    batch = dfn_stage([_row(_white_at(speech16k[16000:32000], 0.0, 3), 16000, "r1"), _row(a, 16000, "r2")])
    np.testing.assert_array_equal(batch[1]["audio_enhanced"], first)


def test_dfn3_refuses_gpu() -> None:
    with pytest.raises(DeviceUnavailableError, match="CPU only"):
        EnhanceStage(EnhanceConfig(backend="deepfilternet3", device="cuda")).check()


def test_dfn3_rejects_a_bsrnn_model_reference() -> None:
    with pytest.raises(ValueError):
        EnhanceConfig(backend="deepfilternet3", model="/some/bsrnn")


# -- row handling --------------------------------------------------------------------------


def test_bad_rows_are_quarantined_not_skipped(dfn_stage: EnhanceStage, speech16k: np.ndarray) -> None:
    bad = speech16k[:8000].copy()
    bad[100] = np.nan
    rows = [_row(speech16k[:8000], 16000, "good"), _row(bad, 16000, "nan"),
            {**_row(speech16k[:8000], 16000, "stereo"), "audio": np.zeros((2, 100), np.float32)},
            {"recording_id": "q", "status": "quarantined", "error": "earlier"}]
    out = {r["recording_id"]: r for r in dfn_stage(rows)}
    assert out["good"]["status"] == "ok" and out["good"]["audio_enhanced"].shape == (8000,)
    assert out["nan"]["status"] == "quarantined" and out["nan"]["failed_stage"] == "enhance"
    assert "NaN" in out["nan"]["error"]
    assert out["stereo"]["status"] == "quarantined" and "1-D" in out["stereo"]["error"]
    assert out["q"]["status"] == "quarantined" and out["q"]["error"] == "earlier"


def test_loud_output_is_scaled_not_clipped(tmp_path: Path) -> None:
    """A gain-2 mask would push a 0.9 peak to 1.8; the stage must scale it to peak_limit."""
    ck = _identity_checkpoint(tmp_path / "ck")
    from safetensors.torch import load_file, save_file

    state = load_file(str(ck / "model.safetensors"))
    for k in [k for k in state if k.startswith("mask.fc2.") and k.endswith(".bias")]:
        b = state[k]
        half = b.shape[0] // 2
        b[:half] = b[:half] * 2.0  # real part of every mask 1 -> 2
    save_file(state, str(ck / "model.safetensors"))
    stage = EnhanceStage(EnhanceConfig(backend="bsrnn", model=str(ck), peak_limit=0.95))
    t = np.arange(48000) / 48000
    x = (0.9 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    y = stage([_row(x, 48000)])[0]["audio_enhanced"]
    assert abs(float(np.max(np.abs(y))) - 0.95) < 1e-4
    assert np.corrcoef(x, y)[0, 1] > 0.999


# -- BSRNN backend -------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_bsrnn_path_is_sample_aligned_and_length_exact(tmp_path: Path, speech16k: np.ndarray, causal: bool) -> None:
    ck = _identity_checkpoint(tmp_path / "ck", causal=causal)
    stage = EnhanceStage(EnhanceConfig(backend="bsrnn", model=str(ck), chunk_seconds=0.7, overlap_seconds=0.2))
    stage.check()
    x = speech16k[: 3 * 16000 + 5]
    out = stage([_row(x, 16000)])[0]
    y = out["audio_enhanced"]
    assert y.shape == x.shape and _lag(y, x) == 0
    # The identity model through 16k -> 48k -> 16k must give back the input (band-limited).
    np.testing.assert_allclose(y, x, atol=2e-3)
    assert out["provenance"]["enhance"]["model"].startswith(f"bsrnn:{ck}@")


def test_bsrnn_matches_the_model_run_directly(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = BSRNN(BSRNNConfig(**TINY)).eval()
    ck = save_checkpoint(model, tmp_path / "ck")
    x = (np.random.default_rng(0).standard_normal(48000) * 0.05).astype(np.float32)
    y = EnhanceStage(EnhanceConfig(backend="bsrnn", model=str(ck), peak_limit=1.0))([_row(x, 48000)])[0]
    np.testing.assert_allclose(y["audio_enhanced"], model.enhance(x, 48000), atol=1e-6)


def test_bsrnn_missing_model_is_one_line(tmp_path: Path) -> None:
    for model in (None, str(tmp_path / "nope")):
        with pytest.raises(ModelNotFoundError) as err:
            EnhanceStage(EnhanceConfig(backend="bsrnn", model=model)).check()
        assert "enhance.model" in str(err.value) and "\n" not in str(err.value)


def test_bsrnn_corrupt_checkpoint_fails_check(tmp_path: Path) -> None:
    ck = _identity_checkpoint(tmp_path / "ck")
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError) as err:
        EnhanceStage(EnhanceConfig(backend="bsrnn", model=str(ck))).check()
    assert "corrupt" in str(err.value) and "\n" not in str(err.value)


def test_bsrnn_mismatched_checkpoint_fails_check(tmp_path: Path) -> None:
    ck = _identity_checkpoint(tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["feature_dim"] = 16
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        EnhanceStage(EnhanceConfig(backend="bsrnn", model=str(ck))).check()


def test_bsrnn_trained_at_other_rate_fails_check(tmp_path: Path) -> None:
    ck = _identity_checkpoint(tmp_path / "ck", sample_rate=16000, n_fft=320, hop_length=160,
                              band_scheme=((4000.0, 1000.0), (8000.0, 4000.0)))
    with pytest.raises(SampleRateError) as err:
        EnhanceStage(EnhanceConfig(backend="bsrnn", model=str(ck))).check()
    assert "16000 Hz" in str(err.value) and "48000 Hz" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kw", [{"device": "cuda"}, {"num_gpus": 1.0}])
def test_gpu_requested_but_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kw: dict) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ck = _identity_checkpoint(tmp_path / "ck")
    stage = EnhanceStage(EnhanceConfig(backend="bsrnn", model=str(ck), **kw))
    with pytest.raises(DeviceUnavailableError) as err:
        stage.check()
    assert "GPU" in str(err.value) and "\n" not in str(err.value)


# -- enhance.when -------------------------------------------------------------------------


def test_when_noisy_enhances_only_noisy_recordings(speech16k: np.ndarray) -> None:
    """noisy: a recording at 5 dB is enhanced, the same speech clean is passed through untouched."""
    stage = EnhanceStage(EnhanceConfig(backend="deepfilternet3", when="noisy"))
    clean, noisy = speech16k, _white_at(speech16k, 5.0)
    out_clean, out_noisy = stage([_row(clean, 16000, "clean"), _row(noisy, 16000, "noisy")])
    assert "audio_enhanced" not in out_clean and out_clean["audio"] is not None
    assert out_clean["enhance_snr_db"] >= stage.config.noisy_below_snr_db
    assert out_noisy["enhance_snr_db"] < stage.config.noisy_below_snr_db
    assert out_noisy["audio_enhanced"].shape == noisy.shape
    # the enhanced stream is what "always" gives for the same recording
    always = EnhanceStage(EnhanceConfig(backend="deepfilternet3"))([_row(noisy, 16000, "noisy")])[0]
    np.testing.assert_array_equal(out_noisy["audio_enhanced"], always["audio_enhanced"])
    assert out_clean["provenance"]["enhance"]["model"] == out_noisy["provenance"]["enhance"]["model"]


def test_when_never_loads_no_model_and_passes_rows_through(speech16k: np.ndarray) -> None:
    stage = EnhanceStage(EnhanceConfig(backend="deepfilternet3", when="never"))
    (out,) = stage([_row(_white_at(speech16k, 0.0), 16000)])
    assert "audio_enhanced" not in out and stage._backend is None

