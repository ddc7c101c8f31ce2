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
from stages.write import OutLayout, ShardWriter, summarize


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
    layout = OutLayout(output)
    layout.write_config(cfg.to_yaml())
    layout.sweep()
    done = {o.source for o in layout.latest_outcomes()}  # re-running resumes: nothing is written twice
    this_run = []
    bar = tqdm(desc="kept utterances", unit="utt", disable=not progress, file=sys.stderr)
    every = max(1, cfg.write.batch_size)
    with ShardWriter(layout, cfg.write) as writer:
        for row in synthesize_corpus(texts, voices, stage.tts, asr, limit, per_text=per_text, stats=stats):  # type: ignore[arg-type]
            if row["source"] in done:
                continue
            audio = resample(row["audio"], row["sample_rate"], cfg.decode.sample_rate)
            duration = audio.shape[0] / cfg.decode.sample_rate
            segment_fields = ("text", "language", "speaker", "verdict", "drop_reasons")
            recording = {
                **{k: v for k, v in row.items() if k not in segment_fields}, "audio": audio,
                "sample_rate": cfg.decode.sample_rate, "duration_s": duration, "status": "ok",
                "segments": [{
                    **{k: row[k] for k in segment_fields if k in row}, "segment_index": 0, "status": "ok",
                    "start_s": 0.0, "end_s": duration, "verdict": "keep", "drop_reasons": [],
                }],
            }
            this_run.append(writer.add(recording))
            if len(this_run) % every == 0:  # commit as we go: a kill loses at most `every` utterances
                writer.commit()
            bar.update(1)
    bar.close()
    summary = summarize(layout.latest_outcomes())
    summary["synth"] = {
        "lines": stats.lines, "attempted": stats.attempted, "kept": stats.kept,
        "dropped": dict(stats.dropped), "errors": stats.errors,
    }
    summary["this_run"] = {**summarize(this_run), "wall_seconds": round(time.perf_counter() - t0, 3)}
    layout.write_quarantine(layout.quarantine_records())
    layout.write_manifest(summary)
    return summary
