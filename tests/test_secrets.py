"""Secrets come from the environment only: never from a config, never into OUT, logs or errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "configs" / "local.yaml"
CANARY = "canary-7f3a9c1e5b2d4f60-do-not-leak"
HUB_ID = "pyannote/speaker-diarization-community-1"


def _write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("section,key", [("diarize", "hf_token"), ("transcribe", "use_auth_token"), ("roundtrip", "api_key")])
def test_a_literal_secret_in_a_profile_is_refused_without_echoing_it(tmp_path: Path, section: str, key: str) -> None:
    p = _write(tmp_path, {section: {key: CANARY}})
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "\n" not in msg and CANARY not in msg
    assert str(p) in msg and f"{section}.{key}" in msg
    assert ("export HF_TOKEN=" in msg) if key != "api_key" else ("environment variable" in msg)


def test_a_literal_secret_by_set_or_by_code_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError, match=r"with --set: diarize\.hf_token: .*export HF_TOKEN") as err:
        load_config(LOCAL, [f"diarize.hf_token={CANARY}"])
    assert CANARY not in str(err.value)
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as verr:
        RunConfig.model_validate({"diarize": {"hf_token": CANARY}})
    assert CANARY not in str(verr.value) and "diarize.hf_token" in str(verr.value)


def test_an_empty_secret_key_from_an_older_config_yaml_is_accepted(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, {"diarize": {"hf_token": None}}))
    assert "hf_token" not in cfg.to_yaml()  # and it is not written back out either


def test_the_hub_token_is_read_from_the_environment(monkeypatch) -> None:
    from stages.diarize.backends import check_pyannote_ref, hub_token
    from kimia_model.refs import ModelNotFoundError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ModelNotFoundError, match=r"\$HF_TOKEN is not set"):
        check_pyannote_ref(HUB_ID, None)
    monkeypatch.setenv("HF_TOKEN", CANARY)
    assert hub_token() == CANARY and check_pyannote_ref(HUB_ID, None) == HUB_ID
    monkeypatch.setenv("MY_HUB_TOKEN", "other")
    assert hub_token(token_env="MY_HUB_TOKEN") == "other"


def test_a_run_never_writes_or_logs_the_token_it_uses(tmp_path: Path, monkeypatch, capsys, caplog) -> None:
    """Everything run() writes into OUT, and everything it logs, is free of the token.

    The diarize stage is the pyannote backend on a hub id, so the token is needed (and
    checked) in preflight; the Ray graph is replaced by one that returns no rows, so the
    test runs in seconds and still goes through the whole write path (config, fingerprint,
    commit log, manifest).
    """
    import pipeline.graph
    import pipeline.ray_local
    import pipeline.run as run_mod

    monkeypatch.setenv("HF_TOKEN", CANARY)
    caplog.set_level(logging.DEBUG)
    cfg = load_config(LOCAL, ["diarize.backend=pyannote", f"diarize.model={HUB_ID}"])
    assert CANARY not in cfg.to_yaml() and "hf_token" not in cfg.to_yaml()

    noop = lambda *a, **k: None  # noqa: E731
    for target in (run_mod, pipeline.ray_local):
        for name in ("_init_ray", "init_ray"):
            monkeypatch.setattr(target, name, noop, raising=False)
    monkeypatch.setattr(pipeline.graph, "build_dataset", noop)
    monkeypatch.setattr(pipeline.graph, "iter_rows", lambda ds: iter(()))
    summary = run_mod.run(cfg, str(ROOT / "examples" / "audio"), tmp_path / "out", address="auto", progress=False)
    assert summary["failed"]  # every input "lost" by the empty graph: the run did go through

    out = tmp_path / "out"
    written = [p for p in out.rglob("*") if p.is_file()]
    assert out / "config.yaml" in written and out / "manifest.json" in written
    leaks = [str(p.relative_to(out)) for p in written if CANARY.encode() in p.read_bytes()]
    assert not leaks
    assert "hf_token" not in (out / "config.yaml").read_text()
    captured = capsys.readouterr()
    assert CANARY not in captured.out + captured.err + caplog.text
