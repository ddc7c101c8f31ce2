"""The data engineer's path end to end: fit a codebook, run with tokens, audit, export.

Everything real: Whisper base (packaged CTranslate2 weights) features, a codebook fitted here
on espeak-ng speech, the CLI on the pytest-audioeval clips.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenized_run(ray_local, tmp_path_factory, english_clips, espeak_conversation) -> Path:
    work = tmp_path_factory.mktemp("tok")
    cache = work / "cache"
    assert main(["tokenizer", "fit", str(espeak_conversation), "--out", "tiny16", "--size", "16",
                 "--iterations", "20", "--set", f"models.cache_dir={cache}"]) == 0
    assert (cache / "codebooks" / "tiny16.safetensors").is_file()
    corpus = work / "in"
    corpus.mkdir()
    for p, _ in english_clips:
        shutil.copy(p, corpus / p.name)
    out = work / "out"
    code = main(["run", "--config", str(ROOT / "configs" / "local.yaml"), "--input", str(corpus), "--output", str(out),
                 "--quiet", "--set", "tokenize.enabled=true", "--set", "tokenize.codebook=tiny16",
                 "--set", "tokenize.store_features=true", "--set", f"models.cache_dir={cache}"])
    assert code == 0
    return out


def test_tokens_are_12_5_hz_and_aligned_with_features(tokenized_run: Path) -> None:
    checked = 0
    for shard in sorted((tokenized_run / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name in [n for n in members if n.endswith(".tokens.npy")]:
            key = name[: -len(".tokens.npy")]
            tokens = np.load(io.BytesIO(members[name]))
            feats = np.load(io.BytesIO(members[f"{key}.whisper.npy"]))
            audio, sr = sf.read(io.BytesIO(members[f"{key}.audio.flac"]))
            assert tokens.dtype == np.int32 and tokens.min() >= 0 and tokens.max() < 16
            assert tokens.shape[0] == math.ceil(len(audio) * 16000 / sr / 1280)
            assert feats.dtype == np.float16 and feats.shape == (tokens.shape[0], 4 * 512)
            meta = json.loads(members[f"{key}.json"])
            assert meta["provenance"]["tokenize"]["config_hash"]
            checked += 1
    assert checked >= 3


def test_audit_of_a_tokenized_run_is_clean(tokenized_run: Path) -> None:
    assert main(["audit", str(tokenized_run)]) == 0
    doc = json.loads((tokenized_run / "audit" / "audit.json").read_text())
    assert doc["integrity"]["ok"], doc["integrity"]["findings"]
    assert (tokenized_run / "audit" / "report.html").stat().st_size > 10_000


def test_export_for_kimi_audio_finetuning(tokenized_run: Path, tmp_path: Path) -> None:
    dest = tmp_path / "export"
    # The run's own resolved config names its tokenizer (tiny16 from the cache), so the
    # provenance check passes; the default profile's codebook would be refused (exit 2).
    assert main(["export", "kimi-audio", str(tokenized_run), str(dest), "--task", "asr"]) == 2
    assert not dest.exists()
    assert main(["export", "kimi-audio", str(tokenized_run), str(dest), "--task", "asr",
                 "--config", str(tokenized_run / "config.yaml")]) == 0
    lines = [json.loads(x) for x in (dest / "data.jsonl").read_text().splitlines()]
    assert len(lines) >= 3
    for line in lines:
        user_audio = next(m for m in line["conversation"] if m["message_type"] == "audio")
        assert Path(user_audio["content"]).is_file()
        assert all(152064 <= t < 152064 + 16384 for t in user_audio["audio_tokens"])
        assert line["conversation"][-1]["role"] == "assistant" and line["conversation"][-1]["content"]
