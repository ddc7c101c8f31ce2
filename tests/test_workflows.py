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


def _run_alone(tmp_path: Path, *args: str, env: dict[str, str] | None = None, flags: tuple[str, ...] = ()):
    """Run workflows/curate.py copied alone into an empty dir, as `ray submit` leaves it on the head."""
    import os
    import shutil
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    script = home / "curate.py"
    shutil.copy(ROOT / "workflows" / "curate.py", script)
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KIMIA_CURATE_HOME")}
    return subprocess.run(
        [sys.executable, *flags, str(script), *args], cwd=home, env={**base, "HOME": str(home), **(env or {})},
        capture_output=True, text=True, timeout=120,
    )


def test_submit_entrypoint_copied_alone_finds_the_installed_project(tmp_path: Path) -> None:
    done = _run_alone(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: kimia-curate run" in done.stdout and "--config" in done.stdout


def test_submit_entrypoint_finds_the_mounted_project_or_says_what_is_missing(tmp_path: Path) -> None:
    # -S: no site-packages, so neither the installed package nor the dependencies are there.
    lost = _run_alone(tmp_path, "--help", flags=("-S",))
    lines = [ln for ln in lost.stderr.splitlines() if ln.strip()]
    assert lost.returncode == 2 and len(lines) == 1 and "cannot find the kimia-curate project" in lines[0], lost.stderr
    # The cluster file's mount point (~/kimia-curate) is found; the missing venv is named.
    (tmp_path / "home" / "kimia-curate").symlink_to(ROOT)
    mounted = _run_alone(tmp_path, "--help", flags=("-S",))
    assert mounted.returncode == 2 and f"found the project at {ROOT}" in mounted.stderr, mounted.stderr
    assert "kimia-venv" in mounted.stderr
    # And the mount point (or $KIMIA_CURATE_HOME) is where relative --config paths resolve.
    homed = _run_alone(tmp_path, "--help", env={"KIMIA_CURATE_HOME": str(ROOT)}, flags=("-S",))
    assert f"found the project at {ROOT}" in homed.stderr, homed.stderr


def test_cluster_file_mounts_setup_and_curate_agree() -> None:
    config = yaml.safe_load((ROOT / "workflows" / "cluster.yaml").read_text())
    mounts = config["file_mounts"]
    assert mounts.get("~/kimia-curate") == "."  # where curate.py looks (MOUNTED)
    setup = "\n".join(config["setup_commands"])
    assert "~/kimia-curate/requirements-cluster.txt" in setup and "-e ~/kimia-curate" in setup
    assert "source ~/kimia-venv/bin/activate" in setup and "RAY_AUTH_MODE=token" in setup
    assert "MOUNTED = \"~/kimia-curate\"" in (ROOT / "workflows" / "curate.py").read_text()
    for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in cmds)


def test_requirements_cluster_matches_pyproject() -> None:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [ln.strip() for ln in (ROOT / "requirements-cluster.txt").read_text().splitlines()]
    assert [ln for ln in lines if ln and not ln.startswith("#")] == deps


def test_cluster_docs_cover_tunnel_auth_and_interpreter() -> None:
    doc = (ROOT / "docs" / "cluster.md").read_text()
    for needle in ("ssh -N -L 8265:127.0.0.1:8265", "RAY_AUTH_MODE=token", "requirements-cluster.txt",
                   "kimia-venv", "--dashboard-host=127.0.0.1"):
        assert needle in doc, needle
