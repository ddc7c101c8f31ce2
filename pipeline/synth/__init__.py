"""The synthesis workflow (``kimia-curate synth``): speech from text, kept when it round-trips.

:mod:`pipeline.synth.corpus` speaks each line of a JSONL file with the TTS backends of
:mod:`kimia_model.tts` and keeps what the ASR hears back; :mod:`pipeline.synth.workflow` writes
the kept utterances as shards in a run's format. A workflow of its own, not a pipeline stage.
"""
