"""BSRNN model, checkpoints and training recipe on tiny configurations (CPU, seconds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from kimia_model.bsrnn import (
    BSRNNConfig,
    CheckpointError,
    SampleRateError,
    load_checkpoint,
    save_checkpoint,
    validate_checkpoint,
)
from kimia_model.bsrnn_train import TrainConfig, si_sdr, train
from factories import TINY_BSRNN, identity_masks_, tiny_bsrnn

SR = 48000
AUDIOEVAL = Path(next(iter(importlib.util.find_spec("pytest_audioeval").submodule_search_locations))) / "samples" / "audio"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def noise(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


# -- geometry ----------------------------------------------------------------------------


def test_default_band_split_covers_every_bin_once() -> None:
    cfg = BSRNNConfig()
    bands = cfg.band_edges()
    assert len(bands) == 41
    assert bands[0] == (0, 2) and bands[-1] == (400, 481)
    assert all(a < b for a, b in bands)
    assert all(b == a2 for (_, b), (a2, _) in zip(bands[:-1], bands[1:]))
    assert bands[-1][1] == cfg.n_freqs


@pytest.mark.parametrize(
    "kw",
    [
        {"band_scheme": ((4000.0, 500.0), (2000.0, 500.0))},  # decreasing
        {"band_scheme": ((30000.0, 1000.0),)},  # above Nyquist
        {"n_fft": 960, "hop_length": 400},  # not a divisor: no exact overlap-add
        {"num_layers": 0},
    ],
)
def test_bad_config_is_rejected(kw: dict) -> None:
    with pytest.raises(ValueError):
        BSRNNConfig(**{**TINY_BSRNN, **kw})


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [1, 479, 4801])
def test_identity_mask_reconstructs_input_exactly(causal: bool, length: int) -> None:
    model = identity_masks_(tiny_bsrnn(causal=causal))
    x = noise(length)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    assert y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=1e-5)


def test_noncausal_chunk_crossfade_has_no_seams() -> None:
    """With an identity mask any seam would show: the fades must sum to one everywhere."""
    model = identity_masks_(tiny_bsrnn(causal=False))
    x = noise(SR * 2 + 77)
    y = model.enhance(x, SR, chunk_seconds=0.3, overlap_seconds=0.1)
    np.testing.assert_allclose(y, x, atol=1e-5)


# -- streaming -----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_seconds", [0.0107, 0.25, 1.0, 60.0])
def test_causal_chunked_equals_whole_file(chunk_seconds: float) -> None:
    model = tiny_bsrnn(causal=True)
    x = noise(SR * 2 + 123)
    with torch.no_grad():
        whole = model(torch.from_numpy(x)).numpy()
    chunked = model.enhance(x, SR, chunk_seconds=chunk_seconds)
    assert chunked.shape == x.shape
    assert np.abs(whole).max() > 1e-3  # a non-trivial output, not two zero arrays
    np.testing.assert_allclose(chunked, whole, atol=1e-5)


def test_causal_model_ignores_the_future() -> None:
    model = tiny_bsrnn(causal=True)
    x = noise(SR)
    x2 = x.copy()
    cut = SR // 2
    x2[cut:] = noise(SR - cut, seed=5)
    with torch.no_grad():
        a, b = model(torch.from_numpy(x)).numpy(), model(torch.from_numpy(x2)).numpy()
    # Output sample s only sees input up to the end of the last frame covering s.
    safe = cut - model.config.n_fft
    np.testing.assert_allclose(a[:safe], b[:safe], atol=1e-6)
    assert np.abs(a[cut:] - b[cut:]).max() > 1e-4


def test_noncausal_model_cannot_stream() -> None:
    model = tiny_bsrnn(causal=False)
    with pytest.raises(RuntimeError, match="causal"):
        model.stream(torch.zeros(1, 960), model.init_stream())


def test_sample_rate_mismatch_is_one_line_error() -> None:
    with pytest.raises(SampleRateError) as err:
        tiny_bsrnn().enhance(np.zeros(16000, np.float32), 16000)
    assert "48000" in str(err.value) and "16000" in str(err.value) and "\n" not in str(err.value)


# -- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    model = tiny_bsrnn(causal=True)
    save_checkpoint(model, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["feature_dim"] == 12
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.config == model.config
    x = noise(4800)
    # Either the directory or its model.safetensors works as a reference.
    again = load_checkpoint(tmp_path / "ck" / "model.safetensors")
    np.testing.assert_array_equal(loaded.enhance(x, SR), model.enhance(x, SR))
    np.testing.assert_array_equal(again.enhance(x, SR), model.enhance(x, SR))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_config_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    ck = save_checkpoint(tiny_bsrnn(), tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["hidden_dim"] = 16
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ck)
    msg = _one_line(err)
    assert "shape mismatch" in msg and "blocks.0.band_fc.weight: checkpoint [12, 24] vs config [12, 32]" in msg


def test_missing_and_unexpected_tensors_are_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    ck = save_checkpoint(tiny_bsrnn(), tmp_path / "ck")
    state = {k: v.contiguous() for k, v in tiny_bsrnn().state_dict().items()}
    state.pop("mask.fc2.0.bias")
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint(ck)
    msg = _one_line(err)
    assert "missing tensors: mask.fc2.0.bias" in msg and "unexpected tensors: extra.weight" in msg


def test_corrupt_checkpoint_is_one_line_error(tmp_path: Path) -> None:
    ck = save_checkpoint(tiny_bsrnn(), tmp_path / "ck")
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ck)
    assert "corrupt" in _one_line(err)
    (ck / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_checkpoint(ck)


def test_bad_or_missing_config_json(tmp_path: Path) -> None:
    ck = save_checkpoint(tiny_bsrnn(), tmp_path / "ck")
    (ck / "config.json").write_text('{"feature_dims": 3}')
    with pytest.raises(CheckpointError, match="unknown BSRNN config keys: feature_dims"):
        load_checkpoint(ck)
    (ck / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config missing"):
        load_checkpoint(ck)


def test_nan_weights_are_rejected(tmp_path: Path) -> None:
    model = tiny_bsrnn()
    with torch.no_grad():
        model.mask.fc2[0].bias[0] = float("nan")
    ck = save_checkpoint(model, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(ck)


# -- training ------------------------------------------------------------------------------


def _corpus(tmp_path: Path) -> tuple[list[str], list[str], list[str]]:
    clean = sorted(str(p) for p in (AUDIOEVAL / "en").glob("*.wav"))
    rng = np.random.default_rng(0)
    nd = tmp_path / "noise"
    nd.mkdir(exist_ok=True)
    white = rng.standard_normal(SR * 2).astype(np.float32) * 0.1
    sf.write(nd / "white.wav", white, SR)
    t = np.arange(SR * 2) / SR
    sf.write(nd / "hum.flac", (0.1 * np.sin(2 * np.pi * 50 * t) + 0.05 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), SR)
    # A short exponential-decay RIR at 16 kHz exercises the RIR resampling path too.
    rir = np.zeros(1600, np.float32)
    rir[20] = 1.0
    rir[21:] = rng.standard_normal(1579).astype(np.float32) * 0.05 * np.exp(-np.arange(1579) / 300.0)
    sf.write(tmp_path / "rir.wav", rir, 16000)
    return clean, [str(nd)], [str(tmp_path / "rir.wav")]


def _train_cfg(tmp_path: Path, steps: int, **kw: object) -> TrainConfig:
    clean, noise_dirs, rir = _corpus(tmp_path)
    return TrainConfig.model_validate(
        {
            "out_dir": str(tmp_path / "run"),
            "model": {**TINY_BSRNN, "band_scheme": [list(p) for p in TINY_BSRNN["band_scheme"]]},
            "data": {
                "clean": clean,
                "noise": noise_dirs,
                "rir": rir,
                "reverb_prob": 0.5,
                "segment_seconds": 0.5,
                "valid_items": 6,
                "snr_db": (0.0, 5.0),
            },
            "optim": {"steps": steps, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0},
            "valid_every": 15,
            "log_every": 5,
            "validate_first": True,
            **kw,
        }
    )


def test_training_lowers_validation_loss_and_resumes(tmp_path: Path) -> None:
    logs: list[str] = []
    hist = train(_train_cfg(tmp_path, 15), log=logs.append)
    (s0, first), (s1, after) = hist["valid"][0], hist["valid"][-1]
    assert (s0, s1) == (0, 15)
    assert after["loss"] < first["loss"]
    assert after["si_sdr"] > first["si_sdr"]
    run = tmp_path / "run"
    for sub in ("last", "best"):
        assert (run / sub / "model.safetensors").is_file() and (run / sub / "train_state.pt").is_file()
    # Resume: a longer run picks up at step 15 instead of starting over.
    logs.clear()
    hist2 = train(_train_cfg(tmp_path, 20, validate_first=False), log=logs.append)
    assert any("resumed" in line and "step 15" in line for line in logs)
    assert hist2["step"] == 20 and hist2["valid"][-1][0] == 20
    # The recipe's checkpoint is what the enhance stage loads.
    model = load_checkpoint(run / "last")
    y = model.enhance(noise(SR // 2), SR)
    assert y.shape == (SR // 2,) and np.isfinite(y).all()


def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    train(_train_cfg(tmp_path, 2, validate_first=False, valid_every=2))
    cfg = _train_cfg(tmp_path, 4, validate_first=False)
    cfg.model["hidden_dim"] = 8
    with pytest.raises(ValueError, match="cannot resume"):
        train(cfg)


def test_mixtures_are_deterministic_and_at_the_requested_snr(tmp_path: Path) -> None:
    from kimia_model.bsrnn_train import build_datasets

    cfg = _train_cfg(tmp_path, 1)
    cfg.data.reverb_prob = 0.0
    cfg.data.snr_db = (5.0, 5.0)
    train_set, _ = build_datasets(cfg, SR)
    mix, ref = train_set[3]
    mix2, _ = train_set[3]
    assert torch.equal(mix, mix2)
    assert mix.shape == (SR // 2,) and float(mix.abs().max()) <= 0.99 + 1e-6
    noise_part = mix - ref
    snr = 10 * torch.log10(ref.pow(2).sum() / noise_part.pow(2).sum())
    assert abs(float(snr) - 5.0) < 0.05


def test_si_sdr_is_scale_invariant() -> None:
    ref = torch.from_numpy(noise(4800))
    est = ref + 0.1 * torch.from_numpy(noise(4800, seed=1))
    assert abs(float(si_sdr(est, ref)) - float(si_sdr(3.0 * est, ref))) < 1e-3
    assert float(si_sdr(ref, ref)) > 60


def test_recipe_entrypoint_trains_from_its_yaml(tmp_path: Path) -> None:
    """workflows/train_bsrnn.py + train_bsrnn.yaml with --set overrides, as a user runs it."""
    import sys

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    try:
        from workflows.train_bsrnn import load_config, main
    finally:
        sys.path.remove(str(root))
    yaml_path = root / "workflows" / "train_bsrnn.yaml"
    full = load_config(yaml_path)  # the shipped recipe validates as is
    assert full.model_config_obj().causal and len(full.model_config_obj().band_edges()) == 41
    clean, noise_dirs, _ = _corpus(tmp_path)
    args = [
        "--config", str(yaml_path),
        "--set", f"out_dir={tmp_path / 'cli'}",
        "--set", f"data.clean={json.dumps(clean)}",
        "--set", f"data.noise={json.dumps(noise_dirs)}",
        "--set", "data.segment_seconds=0.3", "--set", "data.valid_items=2",
        "--set", "model.feature_dim=8", "--set", "model.hidden_dim=8", "--set", "model.num_layers=1",
        "--set", "model.band_scheme=[[4000, 2000], [24000, 10000]]",
        "--set", "optim.steps=3", "--set", "optim.batch_size=2", "--set", "num_workers=0",
        "--set", "valid_every=3",
    ]
    assert main(args) == 0
    assert (tmp_path / "cli" / "best" / "model.safetensors").is_file()
    assert main([*args, "--set", "optim.bogus=1"]) == 2  # a typo is an error, not ignored
