"""The worked examples in docstrings are tests too."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

MODULES = [
    "pipeline.guard", "pipeline.run", "pipeline.usage", "stages.base", "stages.rows", "kimia_model.audio",
    "stages.segment", "stages.language", "stages.transcribe", "stages.textnorm", "stages.zh_punct", "stages.vad", "stages.quality", "stages.filter",
    "stages.write.layout", "stages.write.writer", "pipeline.audit.agg", "pipeline.audit.compare",
    "kimia_model.whisper_vq.timing", "kimia_model.shipped_codebooks",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0


#: Benchmark modules with worked examples (the helpers their figures rest on).
BENCHMARKS = ["corpus", "bench_speed", "bench_wer_seeds"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_docstring_examples(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"benchmarks/{name}.py has no examples"
    assert result.failed == 0
