from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("profile", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_profiles_validate(profile: Path) -> None:
    cfg = load_config(profile)
    assert isinstance(cfg, RunConfig)
    assert cfg.profile == profile.stem


def test_local_profile_is_offline_cpu() -> None:
    cfg = load_config(ROOT / "configs" / "local.yaml")
    assert cfg.device == "cpu"
    assert cfg.transcribe.model.startswith("pkg:")


def _write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    p = _write(tmp_path, {"transcribe": {"beam_sise": 3}})
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and "transcribe.beam_sise" in msg and "unknown key" in msg
    assert "\n" not in msg


def test_wrong_type_is_one_line(tmp_path: Path) -> None:
    p = _write(tmp_path, {"decode": {"sample_rate": "fast"}})
    with pytest.raises(ConfigError, match=r"decode\.sample_rate") as err:
        load_config(p)
    assert "\n" not in str(err.value)


def test_impossible_value(tmp_path: Path) -> None:
    p = _write(tmp_path, {"transcribe": {"batch_size": 0}})
    with pytest.raises(ConfigError, match=r"transcribe\.batch_size: must be >= 1 \(got 0\)"):
        load_config(p)


def test_cross_field_value(tmp_path: Path) -> None:
    p = _write(tmp_path, {"segment": {"min_segment_s": 30, "max_segment_s": 20}})
    with pytest.raises(ConfigError, match="segment"):
        load_config(p)


def test_set_overrides_and_typing(tmp_path: Path) -> None:
    p = _write(tmp_path, {"transcribe": {"beam_size": 5}})
    cfg = load_config(p, ["transcribe.beam_size=1", "transcribe.language=en", "filter.keep_dropped=true"])
    assert cfg.transcribe.beam_size == 1
    assert cfg.transcribe.language == "en"
    assert cfg.filter.keep_dropped is True


def test_set_unknown_key_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"with --set: transcribe\.nope: unknown key"):
        load_config(None, ["transcribe.nope=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["transcribe.beam_size"])


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("transcribe: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "local.yaml", ["transcribe.beam_size=2"])
    again = load_config(_write(tmp_path, yaml.safe_load(cfg.to_yaml())))
    assert again == cfg
    assert again.config_hash() == cfg.config_hash()
