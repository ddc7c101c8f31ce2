"""The docs stay true: the config reference matches the code, and nothing points outside the repo."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

ROOT = Path(__file__).resolve().parent.parent


def _gen():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_reference_is_up_to_date() -> None:
    gen = _gen()
    assert (ROOT / "docs" / "config.md").read_text() == gen.render(), (
        "docs/config.md is stale: run python scripts/gen_config_docs.py")


def test_every_config_key_is_in_the_reference() -> None:
    from pipeline.config import RunConfig

    text = (ROOT / "docs" / "config.md").read_text()

    def keys(model: BaseModel, prefix: str = "") -> list[str]:
        out = []
        for name in type(model).model_fields:
            value = getattr(model, name)
            out += keys(value, f"{prefix}{name}.") if isinstance(value, BaseModel) else [f"{prefix}{name}"]
        return out

    all_keys = keys(RunConfig())
    assert len(all_keys) > 100
    missing = [k for k in all_keys if f"| `{k}` |" not in text]
    assert not missing, f"undocumented config keys: {missing}"


def test_a_key_without_description_fails_the_generator() -> None:
    gen = _gen()

    class Section(BaseModel):
        documented: int = Field(1, description="Has one.")
        silent: int = 2

    with pytest.raises(gen.UndocumentedKeyError, match=r"`demo\.silent`"):
        gen._rows(Section(), "demo.", {p: {} for p in gen.PROFILES})


def test_docs_cover_the_newcomer_topics() -> None:
    docs = {p.name: p.read_text() for p in (ROOT / "docs").glob("*.md")}
    assert {"architecture.md", "config.md", "models.md", "cluster.md"} <= set(docs)
    assert "models verify" in docs["models.md"] and "RECORD" in docs["models.md"]
    assert "whisper-base-1024" in docs["models.md"] and "GLM-4-Voice" in docs["models.md"]


def test_docs_link_only_to_files_in_the_repository() -> None:
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert "shared/reference" not in text and "/work/" not in text, doc.name
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if re.match(r"[a-z]+://", target):
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which is not in the repository"
