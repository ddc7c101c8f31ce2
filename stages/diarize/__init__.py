"""Speaker diarization with Kimi-Audio's post-processing (issue 3).

Public API:
    DiarizeStage, DiarizeConfig: the fan-out stage (recording rows -> segment rows).
    eval_diarization: DER/JER of a config against a folder of RTTM references.

Submodules: ``postprocess`` (pure functions), ``embedders`` (speaker-embedding models),
``backends`` (offline and pyannote), ``evaluate`` (metrics and RTTM I/O).
"""

from __future__ import annotations

from stages.diarize.stage import DiarizeConfig, DiarizeStage

__all__ = ["DiarizeConfig", "DiarizeStage", "eval_diarization"]


def __getattr__(name: str):  # lazy: pyannote.metrics is only imported for evaluation
    if name == "eval_diarization":
        from stages.diarize.evaluate import eval_diarization

        return eval_diarization
    raise AttributeError(name)
