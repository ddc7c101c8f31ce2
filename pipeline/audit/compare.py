"""``audit OUT --against BASE``: what changed between two runs, and why.

"What" is measured per sample: every key of both runs (kept and dropped sets, read from the
Parquet indexes, so no audio is touched) is joined on a 64-bit key hash, and each sample's
transition (kept -> dropped, dropped -> kept, new, gone, reasons changed) is counted with the
drop reasons that appeared or disappeared. "Why" links those reasons to what differs between
the runs: changed config keys (``OUT/config.yaml``) and stages whose model or config hash
differs in the samples' provenance.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.audit.scan import h64

if TYPE_CHECKING:
    from pipeline.audit.agg import RunScan

#: Which config keys and stages can move a drop reason (prefix match on flattened keys).
REASON_CAUSES: dict[str, tuple[str, ...]] = {
    "duration_too_short": ("filter.min_duration_s", "diarize", "vad", "segment"),
    "duration_too_long": ("filter.max_duration_s", "diarize", "vad", "segment"),
    "language_not_allowed": ("filter.languages", "transcribe"),
    "low_language_prob": ("filter.min_language_prob", "transcribe"),
    "low_snr": ("filter.min_snr_db", "quality", "enhance", "decode"),
    "low_dnsmos_ovrl": ("filter.min_dnsmos_ovrl", "quality", "enhance"),
    "low_dnsmos_sig": ("filter.min_dnsmos_sig", "quality", "enhance"),
    "low_dnsmos_bak": ("filter.min_dnsmos_bak", "quality", "enhance"),
    "clipping": ("filter.max_clipping_ratio", "quality.clip_rel_level", "decode"),
    "mostly_silence": ("filter.max_silence_ratio", "quality.silence", "diarize", "vad", "decode"),
    "speaking_rate_too_slow": ("filter.min_words_per_s", "transcribe"),
    "speaking_rate_too_fast": ("filter.max_words_per_s", "transcribe"),
    "text_too_long_for_duration": ("filter.max_chars_per_s", "transcribe"),
    "text_too_short_for_duration": ("filter.min_chars_per_s", "transcribe"),
    "empty_transcript": ("filter.require_text", "transcribe"),
    "repeated_ngrams": ("filter.max_repeat_ngram_ratio", "quality.ngram_n", "transcribe"),
    "high_compression_ratio": ("filter.max_compression_ratio", "transcribe"),
    "no_speech_with_text": ("filter.max_no_speech_prob", "transcribe"),
    "low_asr_confidence": ("filter.min_avg_logprob", "transcribe"),
    "high_roundtrip_wer": ("filter.max_rt_wer", "roundtrip"),
    "duplicate_audio": ("filter.dedupe_within_batch", "write", "decode"),
}

_OTHER_BIT = 63
_EXAMPLES = 5


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values).

    >>> flatten({"filter": {"min_snr_db": 10, "languages": ["en"]}})
    {'filter.min_snr_db': 10, 'filter.languages': ['en']}
    """
    if not isinstance(cfg, dict):
        return {prefix: cfg} if prefix else {}
    flat: dict[str, Any] = {}
    for k, v in cfg.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            flat.update(flatten(v, name))
        else:
            flat[name] = v
    return flat


def config_diff(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Changed keys, baseline ``b`` -> ``a``."""
    fa, fb = flatten(a or {}), flatten(b or {})
    changes = []
    for key in sorted(set(fa) | set(fb)):
        if fa.get(key, "<absent>") != fb.get(key, "<absent>"):
            changes.append({"key": key, "baseline": fb.get(key, "<absent>"), "run": fa.get(key, "<absent>")})
    return changes


class _Verdicts:
    """Per-sample verdicts of one run as parallel numpy arrays (16 bytes per sample)."""

    def __init__(self, out: Path, vocab: dict[str, int]) -> None:
        from stages.write.layout import KEPT, OutLayout

        keys: list[np.ndarray] = []
        kept: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        self.out = out
        self.layout_shards: list[dict[str, Any]] = []
        layout = OutLayout(out)
        try:
            committed = layout.committed_shards()
        except (OSError, ValueError, KeyError):  # reported by the integrity checks
            committed = []
        for shard in committed:
            default_keep = shard.get("root", KEPT) == KEPT
            try:
                table = layout.read_index(shard)
            except Exception:  # noqa: BLE001 - reported by the integrity checks
                continue
            self.layout_shards.append(shard)
            cols = table.column_names
            k = table.column("key").to_pylist() if "key" in cols else []
            v = table.column("verdict").to_pylist() if "verdict" in cols else [None] * len(k)
            r = table.column("drop_reasons").to_pylist() if "drop_reasons" in cols else [None] * len(k)
            keys.append(np.asarray([h64(str(x)) for x in k], np.uint64))
            kept.append(np.asarray([(x == "keep") if x else default_keep for x in v], bool))
            masks.append(np.asarray([_mask(rs, vocab) for rs in r], np.uint64))
        self.keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        self.kept = np.concatenate(kept) if kept else np.zeros(0, bool)
        self.masks = np.concatenate(masks) if masks else np.zeros(0, np.uint64)

    def names(self, wanted: set[int]) -> dict[int, str]:
        from stages.write.layout import OutLayout

        layout = OutLayout(self.out)
        found: dict[int, str] = {}
        for shard in self.layout_shards:
            if len(found) == len(wanted):
                break
            for k in layout.read_index(shard, ["key"]).column("key").to_pylist():
                if (h := h64(str(k))) in wanted:
                    found[h] = str(k)
        return found


def _mask(reasons: Any, vocab: dict[str, int]) -> int:
    if isinstance(reasons, str):
        try:
            reasons = json.loads(reasons)
        except ValueError:
            reasons = [reasons]
    m = 0
    for r in reasons or []:
        bit = vocab.setdefault(str(r), min(len(vocab), _OTHER_BIT))
        m |= 1 << bit
    return m


def _reasons(mask: int, inv: dict[int, str]) -> list[str]:
    return [inv.get(b, "other") for b in range(64) if mask >> b & 1]


def compare_runs(run: RunScan, base: RunScan, doc: dict[str, Any], base_doc: dict[str, Any]) -> dict[str, Any]:
    """The ``comparison`` section of audit.json: baseline ``base`` -> this ``run``."""
    vocab: dict[str, int] = {}
    a, b = _Verdicts(run.out, vocab), _Verdicts(base.out, vocab)
    inv = {bit: r for r, bit in vocab.items()}
    _, ia, ib = np.intersect1d(a.keys, b.keys, assume_unique=False, return_indices=True)
    only_a = np.setdiff1d(a.keys, b.keys)
    only_b = np.setdiff1d(b.keys, a.keys)

    transitions: dict[str, dict[str, Any]] = {}

    def note(kind: str, reasons: list[str], key_hash: int) -> None:
        t = transitions.setdefault(kind, {"count": 0, "reasons": Counter(), "examples": []})
        t["count"] += 1
        t["reasons"].update(reasons or ["(none)"])
        if len(t["examples"]) < _EXAMPLES:
            t["examples"].append(int(key_hash))

    ka, kb, ma, mb = a.kept[ia], b.kept[ib], a.masks[ia], b.masks[ib]
    for i in np.flatnonzero((ka != kb) | (ma != mb)):
        h = int(a.keys[ia[i]])
        if kb[i] and not ka[i]:
            note("kept_to_dropped", _reasons(int(ma[i]), inv), h)
        elif ka[i] and not kb[i]:
            note("dropped_to_kept", _reasons(int(mb[i]), inv), h)
        elif not ka[i]:
            added = _reasons(int(ma[i]) & ~int(mb[i]), inv)
            removed = _reasons(int(mb[i]) & ~int(ma[i]), inv)
            note("drop_reasons_changed", [f"+{r}" for r in added] + [f"-{r}" for r in removed], h)
    for h in only_a[:100_000]:
        note("new_in_run", [], int(h))
    for h in only_b[:100_000]:
        note("missing_from_run", [], int(h))
    if "new_in_run" in transitions:
        transitions["new_in_run"]["count"] = int(only_a.size)
    if "missing_from_run" in transitions:
        transitions["missing_from_run"]["count"] = int(only_b.size)

    want_a = {h for k, t in transitions.items() if k != "missing_from_run" for h in t["examples"]}
    want_b = set(transitions.get("missing_from_run", {}).get("examples", []))
    names = {**a.names(want_a), **b.names(want_b)}

    cfg_changes = config_diff(run.config, base.config)
    prov_a = _stage_stamps(doc)
    prov_b = _stage_stamps(base_doc)
    stage_changes = [
        {"stage": s, "baseline": sorted(prov_b.get(s, [])), "run": sorted(prov_a.get(s, []))}
        for s in sorted(set(prov_a) | set(prov_b))
        if prov_a.get(s) != prov_b.get(s)
    ]
    changed_names = [c["key"] for c in cfg_changes] + [c["stage"] for c in stage_changes]

    out_transitions = {}
    for kind, t in transitions.items():
        reasons = dict(t["reasons"].most_common())
        why: list[str] = []
        for reason in reasons:
            bare = reason.lstrip("+-")
            # Reasons other stages add ("roundtrip_wer>0.3") point at that stage's section.
            causes = REASON_CAUSES.get(bare) or ((bare.split("_")[0],) if "_" in bare else ())
            for cause in causes:
                why.extend(n for n in changed_names if _related(n, cause) and n not in why)
        out_transitions[kind] = {
            "count": int(t["count"]),
            "reasons": reasons,
            "likely_causes": why,
            "examples": [names.get(h, f"<hash {h:016x}>") for h in t["examples"]],
        }

    ta, tb = doc["totals"], base_doc["totals"]
    totals = {
        k: {"baseline": tb.get(k), "run": ta.get(k), "delta": _delta(ta.get(k), tb.get(k))}
        for k in ("hours_in", "hours_kept", "samples_kept", "samples_dropped", "quarantined")
    }
    reasons = {
        r: {"baseline": base_doc["drop_reasons"].get(r, 0), "run": doc["drop_reasons"].get(r, 0),
            "delta": doc["drop_reasons"].get(r, 0) - base_doc["drop_reasons"].get(r, 0)}
        for r in sorted(set(doc["drop_reasons"]) | set(base_doc["drop_reasons"]))
    }
    metrics = {}
    for m, sa in doc["distributions"]["kept"].items():
        sb = base_doc["distributions"]["kept"].get(m)
        if sb:
            metrics[m] = {"baseline_p50": sb["p50"], "run_p50": sa["p50"], "baseline_mean": sb["mean"],
                          "run_mean": sa["mean"], "delta_mean": _delta(sa["mean"], sb["mean"])}
    return {
        "baseline": str(base.out),
        "run": str(run.out),
        "totals": totals,
        "drop_reasons": reasons,
        "metrics_kept": metrics,
        "samples": {"common": int(ia.size), "only_in_run": int(only_a.size), "only_in_baseline": int(only_b.size)},
        "transitions": out_transitions,
        "config_changes": cfg_changes,
        "stage_changes": stage_changes,
        "baseline_integrity_ok": base_doc["integrity"]["ok"],
    }


def _related(changed: str, cause: str) -> bool:
    """Does a changed config key or stage fall under a cause? ``quality`` covers every
    ``quality.*`` key, ``quality.silence`` covers ``quality.silence_threshold_dbfs``.

    >>> _related("quality.silence_threshold_dbfs", "quality.silence"), _related("filter.min_snr_db", "quality")
    (True, False)
    """
    return changed == cause or changed.startswith((cause + ".", cause + "_")) or (
        "." not in cause and changed.split(".")[0] == cause
    )


def _stage_stamps(doc: dict[str, Any]) -> dict[str, set[str]]:
    stamps: dict[str, set[str]] = {}
    for set_prov in doc["provenance"].values():
        for stamp in set_prov:
            stage, _, rest = stamp.partition("|")
            stamps.setdefault(stage, set()).add(rest)
    return stamps


def _delta(a: Any, b: Any) -> Any:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return round(a - b, 6)
    return None
