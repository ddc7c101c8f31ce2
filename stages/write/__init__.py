"""The write stage (shards committed on the workers) and OUT's on-disk layout."""

from stages.write.layout import OutLayout, RecordingOutcome, sha256_file
from stages.write.writer import (
    Duplicates,
    LocalDuplicates,
    ShardWriter,
    Summary,
    WriteConfig,
    WriteStage,
    sample_metadata,
    summarize,
)

__all__ = [
    "Duplicates", "LocalDuplicates", "OutLayout", "RecordingOutcome", "ShardWriter", "Summary", "WriteConfig", "WriteStage",
    "sample_metadata", "sha256_file", "summarize",
]
