"""The cluster files are checked by Ray's own validators, so `ray up` / `ray job submit` accept them."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_yaml_passes_ray_autoscaler_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "workflows" / "cluster.yaml").read_text()))
    validate_config(config)
    assert any("pip install" in c and "kimia-curate" in c for c in config["setup_commands"])


def test_runtime_env_is_a_valid_ray_runtime_env() -> None:
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((ROOT / "workflows" / "runtime_env.yaml").read_text()))
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert ".venv/" in env["excludes"]


def test_submit_entrypoint_joins_the_cluster(monkeypatch) -> None:
    import runpy
    import sys

    monkeypatch.chdir(ROOT)  # curate.py chdirs; monkeypatch restores the cwd afterwards
    seen: list[list[str]] = []
    monkeypatch.setattr("pipeline.cli.main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", ["curate.py", "--input", "/in", "--output", "/out"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        runpy.run_path(str(ROOT / "workflows" / "curate.py"), run_name="__main__")
    except SystemExit as exc:
        assert exc.code == 0
    assert seen == [["run", "--input", "/in", "--output", "/out", "--address", "auto"]]


def test_cluster_dashboard_stays_on_loopback() -> None:
    text = (ROOT / "workflows" / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in text
