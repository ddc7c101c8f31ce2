"""Mergeable aggregates: what one shard's scan returns and how the driver sums them.

The audit must handle an output of 10,000 shards without holding it in memory, so a shard
scan never returns its samples: it returns fixed-bin histograms, counters and bounded
"worst example" lists, all of which merge associatively (shard order and which worker ran
which shard do not matter). Quantiles are read back from the histograms, to bin precision.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Histogram:
    """Fixed-edge histogram with under/overflow bins and exact count, sum, min and max.

    Example:
        >>> h = Histogram.linear(0.0, 10.0, 10)
        >>> for v in (1.5, 2.5, 2.6, 11.0): h.add(v)
        >>> h.n, h.min, h.max, h.quantile(0.5)
        (4, 1.5, 11.0, 2.0)
    """

    lo: float
    hi: float
    bins: int
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]
    n: int = 0
    total: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = np.zeros(self.bins + 2, dtype=np.int64)  # [under, bins..., over]

    @classmethod
    def linear(cls, lo: float, hi: float, bins: int) -> Histogram:
        return cls(lo, hi, bins)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def add(self, value: float | None) -> None:
        if value is None:
            return
        v = float(value)
        if not math.isfinite(v):
            return
        if v < self.lo:
            idx = 0
        elif v > self.hi:
            idx = self.bins + 1
        else:  # the top edge belongs to the last bin (WADA's 100 dB ceiling is in range)
            idx = 1 + min(self.bins - 1, int((v - self.lo) / (self.hi - self.lo) * self.bins))
        self.counts[idx] += 1
        self.n += 1
        self.total += v
        self.min = min(self.min, v)
        self.max = max(self.max, v)

    def merge(self, other: Histogram) -> None:
        if (other.lo, other.hi, other.bins) != (self.lo, self.hi, self.bins):
            raise ValueError("cannot merge histograms with different edges")
        self.counts += other.counts
        self.n += other.n
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def quantile(self, q: float) -> float | None:
        """Approximate quantile: the lower edge of the bin holding it (exact min/max at the ends)."""
        if self.n == 0:
            return None
        target = q * (self.n - 1)
        cum = np.cumsum(self.counts)
        idx = int(np.searchsorted(cum, target, side="right"))
        if idx == 0:
            return self.min
        if idx >= self.bins + 1:
            return self.max
        edge = float(self.edges[idx - 1])
        return min(max(edge, self.min), self.max)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description (counts include the under/overflow bins at the ends)."""
        return {
            "n": self.n,
            "mean": _r(self.mean),
            "min": _r(self.min) if self.n else None,
            "p05": _r(self.quantile(0.05)),
            "p50": _r(self.quantile(0.5)),
            "p95": _r(self.quantile(0.95)),
            "max": _r(self.max) if self.n else None,
            "edges": [_r(e) for e in self.edges.tolist()],
            "counts": self.counts.tolist(),
        }


def _r(v: float | None, nd: int = 4) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), nd)


#: Distributions the audit draws: field -> (low, high, bins). Values outside land in the
#: under/overflow bins, so the edges only set the plot's resolution, not what is counted.
METRICS: dict[str, tuple[float, float, int]] = {
    "duration_s": (0.0, 40.0, 80),
    "snr_db": (-20.0, 100.0, 60),
    "dnsmos_ovrl": (1.0, 5.0, 40),
    "dnsmos_sig": (1.0, 5.0, 40),
    "dnsmos_bak": (1.0, 5.0, 40),
    "words_per_s": (0.0, 8.0, 40),
    "chars_per_s": (0.0, 40.0, 40),
    "tokens_per_s": (10.0, 15.0, 50),
    "transcript_chars": (0.0, 600.0, 60),
    "clipping_ratio": (0.0, 0.02, 40),
    "silence_ratio": (0.0, 1.0, 20),
    "language_prob": (0.0, 1.0, 20),
    "rt_wer": (0.0, 1.0, 20),
    # Beside WER: the primary round-trip measure for languages written without spaces.
    "rt_cer": (0.0, 1.0, 20),
}


@dataclass
class SetAggregate:
    """Everything the audit sums over one sample set (``kept`` or ``dropped``)."""

    samples: int = 0
    seconds: float = 0.0
    recording_seconds: float = 0.0  # recording_duration_s, counted at segment_index 0
    hists: dict[str, Histogram] = field(default_factory=lambda: {k: Histogram(*v) for k, v in METRICS.items()})
    languages: Counter = field(default_factory=Counter)
    drop_reasons: Counter = field(default_factory=Counter)
    speakers_per_recording: Counter = field(default_factory=Counter)
    sources: dict[str, list[float]] = field(default_factory=dict)  # group -> [samples, seconds]
    provenance: Counter = field(default_factory=Counter)  # "stage|model|config_hash" -> samples

    def add_source(self, group: str, seconds: float) -> None:
        acc = self.sources.setdefault(group, [0, 0.0])
        acc[0] += 1
        acc[1] += seconds

    def merge(self, other: SetAggregate) -> None:
        self.samples += other.samples
        self.seconds += other.seconds
        self.recording_seconds += other.recording_seconds
        for k, h in other.hists.items():
            self.hists[k].merge(h)
        self.languages.update(other.languages)
        self.drop_reasons.update(other.drop_reasons)
        self.speakers_per_recording.update(other.speakers_per_recording)
        self.provenance.update(other.provenance)
        for g, (n, s) in other.sources.items():
            acc = self.sources.setdefault(g, [0, 0.0])
            acc[0] += n
            acc[1] += s


@dataclass(order=True)
class Example:
    """One sample worth listening to: where it is and why it was picked."""

    score: float  # larger = worse; heaps keep the k largest
    key: str = field(compare=False)
    shard: str = field(compare=False)
    set_name: str = field(compare=False)
    metric: str = field(compare=False)
    value: Any = field(compare=False)
    info: dict[str, Any] = field(compare=False, default_factory=dict)


class TopK:
    """The k worst examples per metric, mergeable (a bounded min-heap per metric)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.heaps: dict[str, list[Example]] = {}

    def push(self, ex: Example) -> None:
        heap = self.heaps.setdefault(ex.metric, [])
        if len(heap) < self.k:
            heapq.heappush(heap, ex)
        elif ex.score > heap[0].score:
            heapq.heapreplace(heap, ex)

    def merge(self, other: TopK) -> None:
        for heap in other.heaps.values():
            for ex in heap:
                self.push(ex)

    def sorted(self) -> dict[str, list[Example]]:
        return {m: sorted(h, reverse=True) for m, h in self.heaps.items()}


# -- one run's scan ----------------------------------------------------------------------------

SETS = ("kept", "dropped")
MAX_FINDINGS = 500


@dataclass
class RunScan:
    """Everything the audit learned about one output folder (kept in the driver).

    Defined beside the aggregates it holds, not in :mod:`pipeline.audit.core`, so that
    ``compare`` and ``report`` can name it without importing the module that calls them.
    """

    out: Path
    manifest: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    aggs: dict[str, SetAggregate] = field(default_factory=lambda: {s: SetAggregate() for s in SETS})
    topk: TopK = field(default_factory=lambda: TopK(3))
    findings: list[dict[str, Any]] = field(default_factory=list)
    finding_counts: Counter = field(default_factory=Counter)
    checked: Counter = field(default_factory=Counter)
    shards: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SETS, 0))
    bytes: int = 0
    quarantine: dict[str, Any] = field(default_factory=dict)
    backend: str = "local"
    pids: set[int] = field(default_factory=set)

    def find(self, check: str, detail: str, *, set_name: str | None = None, shard: str | None = None,
             key: str | None = None) -> None:
        self.finding_counts[check] += 1
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append({"check": check, "set": set_name, "shard": shard, "key": key, "detail": detail})
