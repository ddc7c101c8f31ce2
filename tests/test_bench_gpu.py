"""benchmarks/bench_gpu.py stays runnable: its CPU smoke run of the GPU recipe, end to end.

CI has no GPU, so this is what keeps ``configs/kimi_audio.yaml`` and the benchmark alive there:
the recipe with small models on a 6.8 s Mandarin clip, in a subprocess as a user runs it (about
40 s on 2 cores). Model outputs are random or small-model labels and are never compared; what is
checked is that every enabled stage ran and reported its time, and every model stage its
device, dtype and attention kernel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.run import plan_stages
from stages.base import StageContext

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = r"(cpu|cuda) (float32|float16|bfloat16|int8\w*) (sdpa|flash_attention_2|eager|ctranslate2|none)"

pytestmark = pytest.mark.slow


def test_cpu_smoke_run_reports_every_stage(tmp_path: Path) -> None:
    audio = tmp_path / "in"
    audio.mkdir()
    shutil.copy(ROOT / "tests" / "data" / "zh" / "zh_01.flac", audio)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--cpu", "--input", str(audio),
         "--out", str(tmp_path / "bench")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "CPU SMOKE RUN" in out and "NOT a GPU figure" in out

    stages = plan_stages(load_config(ROOT / "configs" / "kimi_audio.yaml"), StageContext())
    assert {s.name for s in stages} >= {"decode", "enhance", "diarize", "transcribe", "tokenize", "quality", "write"}
    for s in stages:
        # Every stage also reports its CPU time (a model stage's workers', a task stage's calls').
        cpu = r"\s+CPU\s+\d+\.\d s \(RTF \d+\.\d+\)"
        assert re.search(rf"^\s+{s.name}\s+busy\s+\d+\.\d s\s+RTF \d+\.\d+{cpu}\s+\d+ % of wall", out, re.M), (s.name, out)
        if s.uses_model:
            assert re.search(rf"^\s+{s.name}\s+{RUNTIME}\s+\[\d+ segments?\]", out, re.M), (s.name, out)
    assert re.search(r"^\s+overhead\s+\d+\.\d s", out, re.M)
    assert re.search(r"^total: wall \d+\.\d s .* RTF \d+\.\d+", out, re.M)
    # The tiny checkpoints stay in the benchmark's own scratch folder.
    assert (tmp_path / "bench" / "work" / "models" / "glm-4-voice-tokenizer-tiny" / "config.json").is_file()
