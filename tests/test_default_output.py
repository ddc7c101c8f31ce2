"""The local profile's default output is complete: tokens in every kept sample, exportable at once.

A newcomer runs ``kimia-curate run`` with ``configs/local.yaml`` and an empty model cache, then
``kimia-curate export kimi-audio``: the shipped codebook must be installed on first use (with
provenance), every kept sample must carry ``tokens.npy``, and the export must write records that
validate against the Kimi-Audio fine-tuning format. An export asked for another tokenizer than
the one the shards record must stop with one line and exit 2, writing nothing.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from kimia_model.shipped_codebooks import SHIPPED, cache_path, ensure_codebook, sha256_file
from kimia_model.whisper_vq.codebook_file import CodebookFile
from kimia_model.whisper_vq.timing import token_count
from pipeline.cli import main
from pipeline.export.kimi_audio import TokenizerMismatchError, export_kimi_audio, validate_line
from stages.tokenize import TokenizeConfig, tokenizer_matches

ROOT = Path(__file__).resolve().parent.parent
LOCAL = str(ROOT / "configs" / "local.yaml")


def _install(name: str, cache: str) -> str:
    return str(ensure_codebook(name, Path(cache)))


@pytest.mark.parametrize(("name", "padding"), [("whisper-base-1024-trim", "multiple"), ("whisper-base-1024", "full")])
def test_shipped_codebook_installs_once_under_concurrency(tmp_path: Path, name: str, padding: str) -> None:
    book = SHIPPED[name]
    assert sha256_file(book.file) == book.provenance()["sha256"]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        paths = pool.starmap(_install, [(name, str(tmp_path))] * 8)
    target = cache_path(name, tmp_path)
    assert set(paths) == {str(target)}
    assert sha256_file(target) == book.provenance()["sha256"]
    prov = json.loads(target.with_suffix(".json").read_text())
    assert prov["sha256"] == book.provenance()["sha256"] and prov["model"] == "pkg:whisper-base"
    assert "k-means" in prov["fit"]["how"] and prov["fit"]["from"]
    assert not any("site-packages" in f for f in prov["fit"]["from"])  # named by package, not by a machine's path
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{name}.lock", f"{name}.json", f"{name}.safetensors"]
    book_file = CodebookFile.load(target)
    assert book_file.codebook.shape == (1024, 512) and book_file.padding == padding


def test_a_users_own_codebook_is_never_overwritten(tmp_path: Path) -> None:
    mine = cache_path("whisper-base-1024", tmp_path)
    CodebookFile(np.ones((4, 512), np.float32), 6, "avg", {}).save(mine)
    before = sha256_file(mine)
    assert ensure_codebook("whisper-base-1024", tmp_path) == mine and sha256_file(mine) == before
    assert ensure_codebook(str(mine), tmp_path) is None  # a path is the user's business
    assert ensure_codebook("some-other-name", tmp_path) is None


@pytest.mark.parametrize(("recorded", "requested", "ok"), [
    ("pkg:whisper-base+codebook:whisper-base-1024@ad51a392", "pkg:whisper-base+codebook:whisper-base-1024@ad51a392", True),
    ("pkg:whisper-base+codebook:whisper-base-1024@ad51a392", "pkg:whisper-base+codebook:renamed@ad51a392", True),
    ("pkg:whisper-base+codebook:whisper-base-1024@ad51a392", "pkg:whisper-base+codebook:whisper-base-1024@0badc0de", False),
    ("pkg:whisper-base+codebook:whisper-base-1024@ad51a392", "pkg:whisper-base+codebook:whisper-base-1024", True),
    ("pkg:whisper-base+codebook:whisper-base-1024@ad51a392", "pkg:whisper-tiny.en+codebook:whisper-base-1024@ad51a392", False),
    ("pkg:whisper-base+codebook:whisper-base-1024@ad51a392", "/models/glm-4-voice-tokenizer", False),
    ("/models/glm-4-voice-tokenizer+features:large-v3", "/models/glm-4-voice-tokenizer", True),
    ("<unknown>", "pkg:whisper-base+codebook:whisper-base-1024@ad51a392", False),
])
def test_tokenizer_matches(recorded: str, requested: str, ok: bool) -> None:
    assert tokenizer_matches(recorded, requested) is ok


def test_mismatch_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from test_export_kimi import build_run  # a hand-built shard without tokenize provenance

    run = build_run(tmp_path / "out")
    with pytest.raises(TokenizerMismatchError, match=r"<unknown> \(4 samples\).*--tokenizer"):
        export_kimi_audio(run, tmp_path / "kimi", tokenizer="pkg:whisper-base+codebook:x@ad51a392")
    assert not (tmp_path / "kimi").exists()


# -- the whole default profile, from an empty cache --------------------------------------------


@pytest.fixture(scope="module")
def default_run(ray_local, english_clips, tmp_path_factory) -> tuple[Path, Path]:
    """``run --config configs/local.yaml`` with nothing in the model cache."""
    root = tmp_path_factory.mktemp("default")
    src = root / "in"
    src.mkdir()
    for p, _ in english_clips:
        shutil.copy(p, src / p.name)
    cache = root / "cache"
    out = root / "out"
    code = main(["run", "--config", LOCAL, "--input", str(src), "--output", str(out), "--quiet",
                 "--set", f"models.cache_dir={cache}"])
    assert code == 0
    return out, cache


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((out / "shards").glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                key, _, member = info.name.partition(".")
                f = tar.extractfile(info)
                samples.setdefault(key, {})[member] = f.read() if f else b""
    return samples


def test_every_kept_sample_has_tokens_with_provenance(default_run: tuple[Path, Path]) -> None:
    out, cache = default_run
    name = TokenizeConfig().codebook
    assert name == "whisper-base-1024-trim"  # the shipped codebook fitted on segments at their own length
    codebook = cache_path(name, cache)
    assert codebook.is_file() and codebook.with_suffix(".json").is_file()
    sha8 = sha256_file(codebook)[:8]
    rows = [r for p in sorted((out / "index").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    kept = [r for r in rows if r["verdict"] == "keep"]
    assert kept, "the default run kept nothing"
    samples = _samples(out)
    for r in kept:
        members = samples[r["key"]]
        assert "tokens.npy" in members, r["key"]
        tokens = np.load(io.BytesIO(members["tokens.npy"]))
        assert tokens.dtype == np.int32 and 0 <= tokens.min() and tokens.max() < 1024
        info = sf.info(io.BytesIO(members["audio.flac"]))
        assert len(tokens) == token_count(int(round(info.frames * 16000 / info.samplerate)))
        prov = json.loads(r["provenance"])["tokenize"]["model"]
        assert prov == f"pkg:whisper-base+codebook:{name}@{sha8}"


def test_export_works_on_the_default_output(default_run: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out, cache = default_run
    dest = tmp_path / "kimi"
    assert main(["export", "kimi-audio", str(out), str(dest), "--config", LOCAL,
                 "--set", f"models.cache_dir={cache}"]) == 0
    report = json.loads(capsys.readouterr().out)
    lines = [json.loads(x) for x in (dest / "data.jsonl").read_text().splitlines()]
    assert lines and report["written"] == len(lines) and not report["errors"]
    for line in lines:
        validate_line(line)  # schema, roles, token range, audio file present, token count
        assert line["conversation"][2]["content"].strip()


def test_export_with_another_tokenizer_exits_2_in_one_line(default_run: tuple[Path, Path], tmp_path: Path,
                                                          capsys) -> None:
    out, cache = default_run
    dest = tmp_path / "kimi"
    code = main(["export", "kimi-audio", str(out), str(dest),
                 "--tokenizer", "pkg:whisper-base+codebook:whisper-base-1024@0badc0de"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "0badc0de" in err and "--tokenizer" in err
    assert not dest.exists()
    # The default request comes from --config: a profile whose codebook is another file is refused too.
    other = tmp_path / "other.safetensors"
    CodebookFile(np.random.default_rng(0).normal(size=(8, 512)).astype(np.float32), 6, "avg", {}).save(other)
    code = main(["export", "kimi-audio", str(out), str(dest), "--config", LOCAL,
                 "--set", f"models.cache_dir={cache}", "--set", f"tokenize.codebook={other}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "codebook:other@" in err
    assert not dest.exists()
