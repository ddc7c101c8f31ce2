"""Every user mistake on the command line: one line on stderr, exit 2, no traceback, nothing
written, before Ray starts or a model loads.

Each case runs the real command in a subprocess (``python -m pipeline``), from an empty
working directory, so a default output folder created by mistake would show up there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "local.yaml")


@pytest.fixture()
def work(tmp_path: Path) -> dict[str, Path]:
    """Inputs a user could pass, one of each kind, plus the OUT that must never appear."""
    (tmp_path / "cwd").mkdir()
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "clip.wav", [0.0] * 1600, 16000)
    (tmp_path / "bad.yaml").write_text("transcribe: [beam_size: 1\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"source": "audio/clip.wav"}) + "\n{not json\n")
    (tmp_path / "nosource.jsonl").write_text(json.dumps("audio/clip.wav") + "\n")  # a string, not an entry
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "notarun").mkdir()
    (tmp_path / "rttm").mkdir()
    (tmp_path / "rttm" / "other.rttm").write_text("SPEAKER other 1 0.00 1.00 <NA> <NA> A <NA> <NA>\n")
    (tmp_path / "badrttm").mkdir()
    (tmp_path / "badrttm" / "clip.rttm").write_text("SPEAKER clip 1 zero\n")
    return {"root": tmp_path, "cwd": tmp_path / "cwd", "audio": audio, "out": tmp_path / "OUT"}


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


# (name, argv with {placeholders}, a fragment the one line must contain)
CASES: list[tuple[str, list[str], str]] = [
    ("unknown subcommand", ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("no subcommand", [], "required: COMMAND"),
    ("unknown option", ["run", "-c", CONFIG, "-i", "{audio}", "-o", "{out}", "--frobnicate"], "--frobnicate"),
    ("run without --output", ["run", "-c", CONFIG, "-i", "{audio}"], "--output"),
    ("run, input missing", ["run", "-c", CONFIG, "-i", "{root}/nope", "-o", "{out}"], "--input not found"),
    ("run, glob matches nothing", ["run", "-c", CONFIG, "-i", "{root}/*.nothing", "-o", "{out}"], "--input not found"),
    ("run, output is a file", ["run", "-c", CONFIG, "-i", "{audio}", "-o", "{root}/afile"], "is a file"),
    ("unknown --set key", ["run", "-c", CONFIG, "-i", "{audio}", "-o", "{out}", "--set", "transcribe.beam_sise=1"],
     "did you mean transcribe.beam_size"),
    ("unknown --set section", ["run", "-c", CONFIG, "-i", "{audio}", "-o", "{out}", "--set", "nosuch.key=1"],
     "nosuch: unknown key"),
    ("bad --set value", ["run", "-c", CONFIG, "-i", "{audio}", "-o", "{out}", "--set", "transcribe.beam_size=abc"],
     "transcribe.beam_size"),
    ("out-of-range --set value", ["run", "-c", CONFIG, "-i", "{audio}", "-o", "{out}", "--set", "transcribe.beam_size=0"],
     "must be >= 1"),
    ("--set without =", ["run", "-c", CONFIG, "-i", "{audio}", "-o", "{out}", "--set", "transcribe"],
     "expected section.key=value"),
    ("bad YAML", ["run", "-c", "{root}/bad.yaml", "-i", "{audio}", "-o", "{out}"], "not valid YAML"),
    ("missing config file", ["run", "-c", "{root}/nope.yaml", "-i", "{audio}", "-o", "{out}"], "config file not found"),
    ("bad manifest line", ["run", "-c", CONFIG, "-i", "{root}/bad.jsonl", "-o", "{out}"], "bad.jsonl:2: not valid JSON"),
    ("manifest line not an entry", ["run", "-c", CONFIG, "-i", "{root}/nosource.jsonl", "-o", "{out}"],
     'needs a "source" string'),
    ("inspect, OUT missing", ["inspect", "{out}"], "OUT not found"),
    ("inspect without OUT", ["inspect"], "required: OUT"),
    ("audit, OUT missing", ["audit", "{out}"], "OUT not found"),
    ("audit, not a run", ["audit", "{root}/notarun"], "not the output of a run"),
    ("audit, bad --workers", ["audit", "{root}/notarun", "--workers", "0"], "--workers"),
    ("audit, --against missing", ["audit", "{root}/notarun", "--against", "{root}/nope"], "--against"),
    ("export, OUT missing", ["export", "kimi-audio", "{out}", "{root}/dest"], "OUT not found"),
    ("export, OUT without shards", ["export", "kimi-audio", "{root}/notarun", "{root}/dest"], "no shards"),
    ("export, unknown format", ["export", "parquet", "{out}", "{root}/dest"], "invalid choice: 'parquet'"),
    ("models, unknown action", ["models", "fix"], "invalid choice: 'fix'"),
    ("models, missing config", ["models", "list", "-c", "{root}/nope.yaml"], "config file not found"),
    ("eval, reference missing", ["eval", "diarization", "--reference", "{root}/nope", "--input", "{audio}"],
     "--reference not found"),
    ("eval, input missing", ["eval", "diarization", "--reference", "{root}/bad.yaml", "--input", "{root}/nope"],
     "--input not found"),
    ("eval, no rttm in folder", ["eval", "diarization", "--reference", "{audio}", "--input", "{audio}"],
     "no .rttm files"),
    ("eval, no audio matches a reference", ["eval", "diarization", "--reference", "{root}/rttm", "--input", "{audio}"],
     "matches a reference uri"),
    ("eval, malformed RTTM", ["eval", "diarization", "--reference", "{root}/badrttm", "--input", "{audio}"],
     "malformed RTTM line"),
    ("tokenizer, input missing", ["tokenizer", "fit", "{root}/nope", "--out", "x"], "audio input not found"),
    ("tokenizer, bad --size", ["tokenizer", "fit", "{audio}", "--out", "x", "--size", "1"], "--size must be >= 2"),
    ("tokenizer, --size not a number", ["tokenizer", "fit", "{audio}", "--out", "x", "--size", "many"], "--size"),
    ("synth, texts missing", ["synth", "--texts", "{root}/nope.jsonl", "-o", "{out}"], "--texts not found"),
    ("synth, bad --max-wer", ["synth", "--texts", "{root}/bad.jsonl", "-o", "{out}", "--max-wer", "-1"], "--max-wer"),
]


@pytest.mark.parametrize("name,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_line_exit_2_and_writes_nothing(work: dict[str, Path], name: str, argv: list[str],
                                                       needle: str) -> None:
    args = [a.format(**{k: str(v) for k, v in work.items()}) for a in argv]
    before = _tree(work["root"])
    proc = _cli(args, work["cwd"])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (name, proc.returncode, proc.stderr)
    assert len(lines) == 1, (name, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert needle in lines[0], (name, lines[0])
    assert lines[0].startswith("kimia-curate")
    assert _tree(work["root"]) == before, (name, _tree(work["root"]) ^ before)  # no OUT, no dest, nothing in cwd


HELP = [["--help"], ["run", "--help"], ["inspect", "--help"], ["audit", "--help"], ["eval", "--help"],
        ["eval", "diarization", "--help"], ["tokenizer", "--help"], ["tokenizer", "fit", "--help"],
        ["export", "--help"], ["export", "kimi-audio", "--help"], ["models", "--help"], ["synth", "--help"]]


@pytest.mark.parametrize("argv", HELP, ids=[" ".join(h) for h in HELP])
def test_help_works_on_every_subcommand(tmp_path: Path, argv: list[str]) -> None:
    proc = _cli(argv, tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("usage: kimia-curate")
    if argv[0] == "run":
        text = " ".join(proc.stdout.split())
        for flag in ("--retry-quarantined", "--allow-config-change", "--verbose"):
            assert flag in text
        assert "exit codes: 0" in text and "2 usage or config error" in text and "3 some inputs failed" in text
    assert list(tmp_path.iterdir()) == []


def test_audit_module_entry_point_reports_the_same_way(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.audit", str(tmp_path / "nope")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "OUT not found" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- run's flags and exit code, without running the pipeline -----------------------------------


def _fake_run(monkeypatch: pytest.MonkeyPatch, summary: dict[str, Any], params: tuple[str, ...]) -> list[dict]:
    """Replace ``pipeline.run.run`` with one that accepts ``params`` and records its keyword args."""
    import pipeline.run

    seen: list[dict[str, Any]] = []

    def fake(cfg: Any, input_spec: str, output: str, **kwargs: Any) -> dict[str, Any]:
        unknown = set(kwargs) - {"address", "config_path", "progress", *params}
        if unknown:
            raise TypeError(f"run() got unexpected keyword arguments {sorted(unknown)}")
        seen.append(kwargs)
        return summary

    monkeypatch.setattr(pipeline.run, "run", fake)
    monkeypatch.setattr(pipeline.run, "format_summary", lambda s: "summary")
    return seen


FLAGS = ("retry_quarantined", "allow_config_change", "verbose")


def test_run_passes_its_flags_and_exits_3_on_failed_inputs(monkeypatch, work, capsys) -> None:
    from pipeline.cli import main

    failed = {"failed": [{"source": "/x.wav", "stage": "transcribe", "error": "OSError: disk"}]}
    seen = _fake_run(monkeypatch, failed, FLAGS)
    base = ["run", "-c", CONFIG, "-i", str(work["audio"]), "-o", str(work["out"]), "-q"]
    assert main([*base, "--retry-quarantined", "--allow-config-change", "-v"]) == 3
    assert {k: seen[-1][k] for k in FLAGS} == dict.fromkeys(FLAGS, True)
    seen = _fake_run(monkeypatch, {"failed": []}, FLAGS)
    assert main(base) == 0
    assert not any(seen[-1].get(k) for k in FLAGS)


def test_errors_from_deep_inside_a_command_are_one_line_too(monkeypatch, work, capsys) -> None:
    """A one-line error type raised by run() itself (here: another run holds OUT) exits 2."""
    import pipeline.run
    from pipeline.cli import main
    from pipeline.guard import OutputLockedError

    def locked(*_a: Any, **_k: Any) -> dict:
        raise OutputLockedError(f"{work['out']} is in use by pid 1\non host h: wait for it or pass another --output")

    monkeypatch.setattr(pipeline.run, "run", locked)
    assert main(["run", "-c", CONFIG, "-i", str(work["audio"]), "-o", str(work["out"]), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in use by pid 1; on host h" in err


def test_an_unexpected_error_is_not_hidden(monkeypatch, work) -> None:
    """Only mistakes the user can fix are turned into one line; a bug keeps its traceback."""
    import pipeline.run
    from pipeline.cli import main

    def broken(*_a: Any, **_k: Any) -> dict:
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline.run, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["run", "-c", CONFIG, "-i", str(work["audio"]), "-o", str(work["out"]), "-q"])
