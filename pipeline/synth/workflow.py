"""``kimia-curate synth``: speech from text, kept only when it passes the round-trip check,
written as shards in the same format as a curation run (the way Kimi-Audio built
conversation data from TTS).

Each kept utterance becomes a one-segment recording, so readers, ``inspect``, ``audit`` and
``export`` treat synthetic and curated shards alike. Runs in-process: the work is one TTS
call and one batched ASR call per utterance.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from kimia_model.audio import resample
from pipeline.config import RunConfig
from stages.base import StageContext
from stages.write import EncodeStage, ShardSink, summarize


def run_synth(
    cfg: RunConfig, texts: Path, output: Path, voices: list[str], *, threshold: float | None = None,
    per_text: str = "cycle", progress: bool = True,
) -> dict[str, Any]:
    """Speak ``texts`` with ``voices`` (roundtrip.tts_backend), keep what the ASR hears back."""
    from tqdm import tqdm

    from pipeline.synth.corpus import SynthStats, synthesize_corpus
    from stages.roundtrip import RoundtripStage
    from stages.transcribe import build_asr

    t0 = time.perf_counter()
    context = StageContext(cache_dir=Path(cfg.models.cache_dir).expanduser())
    rt = cfg.roundtrip.model_copy(update={"enabled": True, "mode": "label"})
    stage = RoundtripStage(rt, context)
    stage.check()
    stage.setup()
    asr = build_asr(rt.asr, context, stage.resolve_device())
    limit = rt.max_wer if threshold is None else threshold
    stats = SynthStats()
    encode = EncodeStage(cfg.write, context)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    bar = tqdm(desc="kept utterances", unit="utt", disable=not progress, file=sys.stderr)
    with ShardSink(out, cfg.write) as sink:
        done = sink.committed_sources()  # re-running resumes: committed utterances are not written twice
        for row in synthesize_corpus(texts, voices, stage.tts, asr, limit, per_text=per_text, stats=stats):  # type: ignore[arg-type]
            if row["source"] in done:
                continue
            audio = resample(row["audio"], row["sample_rate"], cfg.decode.sample_rate)
            duration = audio.shape[0] / cfg.decode.sample_rate
            segment = {
                **row, "audio": audio, "sample_rate": cfg.decode.sample_rate, "duration_s": duration,
                "recording_duration_s": duration, "segment_index": 0, "segment_count": 1,
                "start_s": 0.0, "end_s": duration, "verdict": "keep", "drop_reasons": [],
            }
            sink.add_recording(encode([segment]))
            bar.update(1)
    bar.close()
    summary = summarize(sink.latest())
    summary["synth"] = {
        "lines": stats.lines, "attempted": stats.attempted, "kept": stats.kept,
        "dropped": dict(stats.dropped), "errors": stats.errors,
    }
    summary["this_run"] = {**summarize(sink.this_run), "wall_seconds": round(time.perf_counter() - t0, 3)}
    sink.write_manifest(summary)
    return summary
