"""Exports of a finished run's shards into the formats training code reads.

One module per format (``kimia-curate export FORMAT OUT DEST``): :mod:`pipeline.export.kimi_audio`
writes Kimi-Audio fine-tuning JSONL. Exports only read OUT; they are not pipeline stages.
"""
