"""Former home of the OUT guards, now in :mod:`pipeline.guard`; kept so existing imports work.

Everything here is the same object as in :mod:`pipeline.guard` (so ``except
OutputLockedError`` catches either), plus :func:`check_fingerprint`, the check-and-record
step callers used before :func:`pipeline.guard.check_config_compatible` and
:func:`pipeline.guard.save_fingerprint` were split.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.guard import (
    FINGERPRINT_FILE,
    LOCK_NAME,
    SPEED_KEYS,
    SPEED_SECTIONS,
    ConfigChangedError,
    OutputLock,
    OutputLockedError,
    check_config_compatible,
    output_fingerprint,
    save_fingerprint,
    saved_fingerprint,
)

__all__ = [
    "FINGERPRINT_FILE", "LOCK_NAME", "SPEED_KEYS", "SPEED_SECTIONS", "ConfigChangedError", "OutputLock",
    "OutputLockedError", "check_fingerprint", "output_fingerprint",
]


def check_fingerprint(out: Path, fingerprint: str, *, allow_change: bool) -> None:
    """Refuse a fingerprint other than OUT's unless ``allow_change``; then record it.

    Raises:
        ConfigChangedError: see :func:`pipeline.guard.check_config_compatible`.
    """
    check_config_compatible(out, fingerprint, allow_change)
    if saved_fingerprint(out) != fingerprint:
        save_fingerprint(out, fingerprint)
