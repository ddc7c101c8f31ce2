"""report.html: one self-contained page (inline SVG plots, base64 audio, no scripts or links),
so it opens offline, survives being mailed around, and cannot break on a missing asset.
"""

from __future__ import annotations

import base64
import html
import io
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.audit.agg import RunScan

#: Audio players are trimmed to this many seconds to keep the page light.
MAX_PLAYER_S = 10.0

_PLOTTED = (
    ("duration_s", "Segment duration (s)"),
    ("snr_db", "WADA-SNR (dB)"),
    ("dnsmos_ovrl", "DNSMOS overall (1-5)"),
    ("words_per_s", "Speaking rate (words/s)"),
    ("chars_per_s", "Speaking rate (letters/s)"),
    ("tokens_per_s", "Semantic tokens per second"),
    ("transcript_chars", "Transcript length (characters)"),
    ("rt_wer", "Round-trip WER"),
    ("rt_cer", "Round-trip CER (the measure for zh, ja, ko)"),
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#1d2430;padding:0 1rem}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #e3e7ee;padding-bottom:.3rem;margin-top:2.2rem}
.cards{display:flex;flex-wrap:wrap;gap:.8rem}.card{background:#f4f6fa;border-radius:8px;padding:.7rem 1rem;
min-width:9rem}.card b{display:block;font-size:1.4rem}
table{border-collapse:collapse;width:100%;font-size:.9rem;margin:.5rem 0}
th,td{border-bottom:1px solid #e3e7ee;text-align:left;padding:.3rem .5rem;vertical-align:top}
th{background:#f4f6fa}.pass{color:#17803d;font-weight:600}.fail{color:#c62828;font-weight:700}
.skipped{color:#888}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:1rem}
figure.plot{margin:0;background:#fff;border:1px solid #e3e7ee;border-radius:6px;padding:.3rem}
figure.plot svg{width:100%;height:auto;display:block}figcaption{font-size:.85rem;color:#555}
.bad{background:#fdecea}code{font-size:.85rem}audio{width:260px}.muted{color:#777}
"""


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    # No RDF metadata block: it carries a timestamp (reports would never be byte-identical).
    fig.savefig(buf, format="svg", bbox_inches="tight",
                metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: inline SVG needs neither


def _figure(plot_id: str, caption: str, svg: str) -> str:
    return (f'<figure class="plot" id="plot-{plot_id}" data-plot="{plot_id}">{svg}'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _plots(doc: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "kimia-audit", "font.size": 9})
    figs: list[str] = []

    reasons = doc["drop_reasons"]
    if reasons:
        items = sorted(reasons.items(), key=lambda kv: kv[1])
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(items) + 1))
        ax.barh([k for k, _ in items], [v for _, v in items], color="#c62828")
        ax.set_xlabel("segments dropped")
        ax.set_title("Drop reasons (a segment may have several)")
        figs.append(_figure("drop_reasons", f"source: {doc['drop_reasons_source']}", _svg(fig)))

    for metric, label in _PLOTTED:
        fig, ax = plt.subplots(figsize=(5, 3))
        drawn = False
        for set_name, color in (("kept", "#1565c0"), ("dropped", "#c62828")):
            s = doc["distributions"][set_name].get(metric)
            if not s:
                continue
            edges = np.asarray(s["edges"], float)
            counts = np.asarray(s["counts"][1:-1], float)
            ax.stairs(counts, edges, fill=True, alpha=0.45, color=color,
                      label=f"{set_name} (n={s['n']}, median {s['p50']})")
            drawn = True
            under, over = s["counts"][0], s["counts"][-1]
            if under or over:
                ax.annotate(f"{set_name}: {under} below / {over} above range",
                            (0.01, 0.92 if set_name == "kept" else 0.84),
                            xycoords="axes fraction", fontsize=7, color=color)
        if not drawn:
            plt.close(fig)
            continue
        if metric == "tokens_per_s":
            ax.axvline(12.5, color="#333", lw=1, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel("segments")
        ax.legend(fontsize=7, loc="upper right")
        figs.append(_figure(metric, label, _svg(fig)))

    langs = doc["languages"]["kept"]
    if langs:
        items = list(langs.items())[:20]
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar([k for k, _ in items], [v for _, v in items], color="#1565c0")
        ax.set_ylabel("kept segments")
        ax.set_title("Language (kept)")
        figs.append(_figure("languages", "Whisper language per kept segment", _svg(fig)))

    spk = doc["speakers_per_recording"]
    if spk:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar([str(k) for k in spk], list(spk.values()), color="#6a1b9a")
        ax.set_xlabel("speakers in the recording's kept segments")
        ax.set_ylabel("recordings")
        figs.append(_figure("speakers", "Speakers per recording", _svg(fig)))
    return figs


def _audio_uri(out: Path, set_name: str, shard: str, key: str) -> str | None:
    """A ``data:`` URI with the sample's audio (trimmed to MAX_PLAYER_S), or None if unreadable."""
    import soundfile as sf

    from stages.write.layout import DROPPED, KEPT, OutLayout

    layout = OutLayout(out)
    try:
        with tarfile.open(layout.shard_path(layout.ref(shard, KEPT if set_name == "kept" else DROPPED)), "r") as tar:
            member = tar.extractfile(f"{key}.audio.flac")
            if member is None:
                return None
            audio, sr = sf.read(io.BytesIO(member.read()), dtype="float32")
    except Exception:  # noqa: BLE001 - a damaged shard is reported by the integrity section
        return None
    audio = audio[: int(MAX_PLAYER_S * sr)]
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format="FLAC", subtype="PCM_16")
    return "data:audio/flac;base64," + base64.b64encode(buf.getvalue()).decode()


def _table(headers: list[str], rows: list[list[Any]], row_class: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{row_class[i]}"' if row_class and row_class[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _e(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape("" if v is None else str(v))


def render_html(doc: dict[str, Any], run: RunScan) -> str:
    """The whole report page for an audit.json document."""
    t = doc["totals"]
    integ = doc["integrity"]
    parts: list[str] = []
    parts.append(f"<h1>kimia-curate audit</h1><p class='muted'><code>{_e(doc['out'])}</code></p>")
    status = "<span class='pass'>PASS</span>" if integ["ok"] else "<span class='fail'>FAIL</span>"
    cards = [
        ("Hours in", t["hours_in"]),
        ("Hours kept", t["hours_kept"]),
        ("Segments kept", t["samples_kept"]),
        ("Segments dropped", t["samples_dropped"]),
        ("Quarantined inputs", t["quarantined"]),
        ("Shards", sum(t["shards"].values())),
    ]
    parts.append("<div class='cards'>" + "".join(f"<div class='card'>{_e(k)}<b>{_e(v)}</b></div>" for k, v in cards)
                 + f"<div class='card'>Integrity<b>{status}</b></div></div>")
    parts.append(f"<p class='muted'>hours in: {_e(t['hours_in_source'])}</p>")

    # Integrity first: a report on a broken output must say so before any plot.
    parts.append("<h2 id='integrity'>Integrity</h2>")
    rows, classes = [], []
    for check, c in integ["checks"].items():
        badge = f"<span class='{c['status']}'>{c['status']}</span>"
        rows.append([f"<code>{check}</code>", badge, c["checked"], c["failures"]])
        classes.append("bad" if c["status"] == "fail" else "")
    parts.append(_table(["check", "status", "checked", "failures"], rows, classes))
    if integ["findings"]:
        parts.append(f"<p>{integ['findings_total']} findings (first {len(integ['findings'])} listed):</p>")
        parts.append(_table(["check", "set", "shard", "key", "finding"],
                            [[_e(f["check"]), _e(f["set"]), _e(f["shard"]), _e(f["key"]), _e(f["detail"])]
                             for f in integ["findings"]]))

    parts.append("<h2 id='plots'>Distributions and drop reasons</h2><div class='grid'>")
    parts.extend(_plots(doc))
    parts.append("</div>")
    if doc["drop_reasons"]:
        parts.append(_table(["drop reason", "segments"], [[_e(k), v] for k, v in doc["drop_reasons"].items()]))

    parts.append("<h2 id='sources'>Per source</h2>")
    src = doc["sources"][:50]
    parts.append(_table(["source", "kept", "hours kept", "dropped", "hours dropped"],
                        [[_e(r["source"]), r["samples_kept"], _e(r["hours_kept"]), r["samples_dropped"],
                          _e(r["hours_dropped"])] for r in src]))
    if len(doc["sources"]) > 50:
        parts.append(f"<p class='muted'>{len(doc['sources']) - 50} more sources in audit.json</p>")

    parts.append("<h2 id='examples'>Worst kept examples and dropped examples</h2>")
    rows = []
    for ex in doc["worst_examples"]:
        uri = _audio_uri(run.out, ex["set"], ex["shard"], ex["key"])
        player = (f"<audio controls preload='metadata' src='{uri}'></audio>" if uri
                  else "<span class='fail'>audio unreadable</span>")
        rows.append([_e(ex["metric"]), _e(ex["value"]), f"<code>{_e(ex['key'])}</code><br>{_e(ex['set'])}",
                     player, _e(ex.get("text")), _e(ex.get("language")), _e(ex.get("duration_s"))])
    parts.append(_table(["why listed", "value", "key", "listen", "transcript", "lang", "s"], rows))

    q = doc["quarantine"]
    parts.append(f"<h2 id='quarantine'>Quarantine</h2><p>{_e(q.get('count'))} inputs quarantined.</p>")
    if q.get("by_stage"):
        parts.append(_table(["stage", "inputs"], [[_e(k), v] for k, v in q["by_stage"].items()]))
    if q.get("top_errors"):
        parts.append(_table(["error", "count"], [[_e(e["error"]), e["count"]] for e in q["top_errors"]]))

    cmp_ = doc.get("comparison")
    if cmp_:
        parts.append(f"<h2 id='comparison'>Compared with <code>{_e(cmp_['baseline'])}</code></h2>")
        parts.append(_table(["total", "baseline", "this run", "change"],
                            [[_e(k), _e(v["baseline"]), _e(v["run"]), _e(v["delta"])]
                             for k, v in cmp_["totals"].items()]))
        parts.append("<h3>What changed per sample</h3>")
        if not cmp_["transitions"]:
            parts.append("<p>No sample changed verdict or drop reasons; no sample appeared or disappeared.</p>")
        parts.append(_table(
            ["transition", "segments", "reasons", "likely causes", "examples"],
            [[_e(k), v["count"], _e(", ".join(f"{r} ({n})" for r, n in v["reasons"].items())),
              _e(", ".join(v["likely_causes"]) or "-"), _e(", ".join(v["examples"]))]
             for k, v in cmp_["transitions"].items()]) if cmp_["transitions"] else "")
        parts.append("<h3>Why: configuration and stage changes</h3>")
        if cmp_["config_changes"]:
            parts.append(_table(["config key", "baseline", "this run"],
                                [[f"<code>{_e(c['key'])}</code>", _e(c["baseline"]), _e(c["run"])]
                                 for c in cmp_["config_changes"]]))
        else:
            parts.append("<p>No config change.</p>")
        if cmp_["stage_changes"]:
            parts.append(_table(["stage", "baseline model|config", "this run"],
                                [[_e(c["stage"]), _e(", ".join(c["baseline"])), _e(", ".join(c["run"]))]
                                 for c in cmp_["stage_changes"]]))
        parts.append(_table(["drop reason", "baseline", "this run", "change"],
                            [[_e(k), v["baseline"], v["run"], v["delta"]] for k, v in cmp_["drop_reasons"].items()]))
        parts.append(_table(["metric (kept)", "baseline median", "run median", "mean change"],
                            [[_e(k), _e(v["baseline_p50"]), _e(v["run_p50"]), _e(v["delta_mean"])]
                             for k, v in cmp_["metrics_kept"].items()]))

    if any(doc["provenance"].values()):
        parts.append("<h2 id='provenance'>Provenance</h2>")
        rows = [[_e(s), *(_e(x) for x in stamp.split("|", 2)), n]
                for s, prov in doc["provenance"].items() for stamp, n in prov.items()]
        parts.append(_table(["set", "stage", "model", "config hash", "segments"], rows))

    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'><link rel='icon' href='data:,'>"
            f"<title>kimia-curate audit</title><style>{_CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
