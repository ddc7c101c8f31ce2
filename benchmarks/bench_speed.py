"""Speed beside faster-whisper: labelling only, and the full local profile, whole processes.

On the same files and the same CTranslate2 Whisper weights (``pkg:whisper-base``), one after
the other, each as its own process so start-up (imports, Ray, model loads) is counted:

* **peer**: faster-whisper's ``BatchedInferencePipeline`` (Silero VAD, batch 8, beam 5,
  ``benchmarks/peer.py``), the speed to beat;
* **label-only**: ``kimia-curate run`` with decode, VAD segmentation, transcribe and write
  (enhance, diarize, tokenize, quality and filter off);
* **full**: ``kimia-curate run -c configs/local.yaml``.

Printed per run: wall time, real-time factor (wall / audio seconds), corpus WER against the
generated transcripts (``stages.textnorm.corpus_wer``, every segment's label whether the
filter kept it or not; the full profile does not transcribe the segments its audio checks drop,
``transcribe.kept_only``, so its reference leaves out the turns those segments hold), the
ratio to the peer's wall time, and from the run's manifest each stage's busy time and RTF, its
CPU time and CPU RTF (a model stage's worker processes, start-up included; a task stage's
calls: busy time also counts waiting for a core, CPU time does not), and the framework
overhead (``pipeline.run.stage_profile``).

    .venv/bin/python benchmarks/bench_speed.py              # ~8 min of espeak-ng speech, cached
    .venv/bin/python benchmarks/bench_speed.py --quick      # ~2 min
    .venv/bin/python benchmarks/bench_speed.py --input DIR --refs refs.json   # your corpus
    .venv/bin/python benchmarks/bench_speed.py --only label --set transcribe.beam_size=1
    .venv/bin/python benchmarks/bench_speed.py --seed 13-16   # four corpora as one ~33 min run

Timings are of one run each on whatever else the machine is doing. On a shared machine,
``--repeat N`` runs every selected run N times, interleaved round by round (peer, label-only,
full, peer, ...) so that a burst of outside load hits them alike, and prints each run's median
wall and CPU time with their range, and the median of the per-round ratios to the peer; the
stage profile is the median run's.

    .venv/bin/python benchmarks/bench_speed.py --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from corpus import WORK, joined_corpus, parse_seeds, turns_outside  # noqa: E402

from pipeline.run import overhead_parts  # noqa: E402
from stages.textnorm import corpus_wer  # noqa: E402

LABEL_ONLY = [
    "enhance.enabled=false", "diarize.enabled=false", "segment.enabled=true", "tokenize.enabled=false",
    "quality.enabled=false", "filter.enabled=false", "roundtrip.enabled=false",
]


def _tree_cpu(root: int) -> dict[tuple[int, str], float]:
    """CPU seconds (user + system) of ``root`` and its live descendants, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, str, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        # fields[1] = ppid, [11] utime, [12] stime, [19] start time (ticks since boot)
        stats[int(entry.name)] = (int(fields[1]), fields[19], (int(fields[11]) + int(fields[12])) / tick)
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _, _) in stats.items():
        children[ppid].append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[(pid, stats[pid][1])] = stats[pid][2]
            todo += children[pid]
    return out


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one process and every process under it (Ray's included).

    CPU time moves less than wall time with other load on the machine. It is polled every
    0.2 s over the process tree (Ray's workers are not reaped into the driver's rusage), so a
    process's last 0.2 s, or a process living less than that, is missed. The process's
    output is shown only if it fails.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cpu: dict[tuple[int, str], float] = {}
    while proc.poll() is None:
        cpu.update(_tree_cpu(proc.pid))
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(stdout[-4000:] + stderr[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return dt, sum(cpu.values())


def run_peer(folder: Path, texts_path: Path, threads: int) -> tuple[float, float, dict[str, str]]:
    """Wall and CPU seconds of ``benchmarks/peer.py`` on ``folder``, and its transcript per file name."""
    wall, cpu = timed([sys.executable, str(ROOT / "benchmarks" / "peer.py"), str(folder), "--json", str(texts_path),
                       "--threads", str(threads)])
    return wall, cpu, json.loads(texts_path.read_text())


def run_texts(out: Path) -> tuple[dict[str, str], dict[str, list[tuple[float, float]]]]:
    """Per input file name, its segments' labels joined in order (kept and dropped alike), and
    the spans of the segments that were never transcribed (dropped by the audio checks first,
    ``transcribe.kept_only``)."""
    from stages.write import OutLayout

    layout = OutLayout(out)
    segs: dict[str, list[tuple[int, str]]] = defaultdict(list)
    skipped: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for shard in layout.committed_shards():
        table = layout.read_index(shard).to_pylist()
        for row in table:
            name = Path(str(row["source"])).name
            if row.get("text") is None:
                skipped[name].append((float(row["start_s"]), float(row["end_s"])))
                continue
            segs[name].append((int(row["segment_index"]), row["text"]))
    return {name: " ".join(t for _, t in sorted(items)) for name, items in segs.items()}, dict(skipped)


def transcribed_refs(meta: list[dict], skipped: dict[str, list[tuple[float, float]]]) -> dict[str, str]:
    """Per file, the generated turns whose midpoint lies in no untranscribed segment: the
    reference for a run that did not transcribe everything, so its WER is over the speech it
    labelled instead of counting every skipped turn as deleted words.

    >>> meta = [{"file": "a.wav", "turns": [(0.0, 2.0, "v", "one"), (2.5, 4.0, "v", "two")]}]
    >>> transcribed_refs(meta, {"a.wav": [(2.4, 4.1)]}), transcribed_refs(meta, {})
    ({'a.wav': 'one'}, {'a.wav': 'one two'})
    """
    return {rec["file"]: " ".join(t[3] for t in turns_outside(rec["turns"], skipped.get(rec["file"], [])))
            for rec in meta}


class Run(NamedTuple):
    """One timed run: whole-process wall and CPU seconds, corpus WER, stage profile lines."""

    wall: float
    cpu: float
    wer: float | None
    lines: list[str]
    untranscribed: int = 0


def median_run(runs: list[Run]) -> Run:
    """The run with the median wall time (the lower middle one of an even count).

    >>> median_run([Run(3.0, 1, None, []), Run(1.0, 1, None, []), Run(2.0, 1, None, [])]).wall
    2.0
    """
    return sorted(runs, key=lambda r: r.wall)[(len(runs) - 1) // 2]


def score(refs: dict[str, str], hyps: dict[str, str]) -> float:
    names = sorted(refs)
    return corpus_wer([refs[n] for n in names], [hyps.get(n, "") for n in names])


def kimia(folder: Path, out: Path, config: Path, sets: list[str]) -> tuple[tuple[float, float], dict[str, Any]]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline", "run", "-c", str(config), "-i", str(folder), "-o", str(out), "-q"]
    for s in sets:
        cmd += ["--set", s]
    times = timed(cmd)
    return times, json.loads((out / "manifest.json").read_text())["summary"]["this_run"]


def profile_lines(run: dict[str, Any], wall: float, audio_s: float) -> list[str]:
    prof = run.get("profile") or {}
    lines = []
    for name, st in (prof.get("stages") or {}).items():
        when = f"  {st['first_s']:5.1f}-{st['last_s']:5.1f} s" if "first_s" in st else ""
        used = f"  CPU {st['cpu_s']:6.1f} s (RTF {st['cpu_rtf']:.4f})" if st.get("cpu_s") is not None else ""
        lines.append(f"    {name:11s} busy {st['busy_s']:7.1f} s  RTF {st['rtf']:.4f}{used}  "
                     f"{100 * (st.get('share_of_wall') or 0):3.0f} % of wall  x{st['workers']} workers"
                     + (f" x{st['calls_per_worker']} calls" if st.get("calls_per_worker") else "") + when)
    inner = run.get("wall_seconds") or 0.0
    lines.append(f"    overhead    {prof.get('overhead_s', 0):7.1f} s of the run's own {inner:.1f} s "
                 f"({100 * (prof.get('overhead_share') or 0):.0f} %; busiest stage {prof.get('busiest')}; "
                 + "; ".join(overhead_parts(prof)) + f"); process start-up and exit {wall - inner:.1f} s")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about 2 minutes of audio instead of 8")
    ap.add_argument("--minutes", type=float, default=None, help="generated corpus size (default 8, --quick 2)")
    ap.add_argument("--seed", type=parse_seeds, default=[13],
                    help="corpus seed; several (13-16 or 13,15) join their corpora into one longer run")
    ap.add_argument("--input", type=Path, default=None, help="a folder of .wav/.flac instead of the generated corpus")
    ap.add_argument("--refs", type=Path, default=None, help='with --input: JSON {"file name": "transcript"}')
    ap.add_argument("--only", choices=["peer", "label", "full"], action="append", default=None,
                    help="run only these (repeatable); default all three")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "local.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra override for both kimia-curate runs")
    ap.add_argument("--threads", type=int, default=2, help="peer's CTranslate2 threads")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every selected run, interleaved (medians printed)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    import soundfile as sf

    meta: list[dict] = []
    if args.input:
        folder = args.input
        refs = json.loads(args.refs.read_text()) if args.refs else {}
    else:
        minutes = args.minutes or (2.0 if args.quick else 8.0)
        folder, meta = joined_corpus(minutes, args.seed)
        refs = {rec["file"]: " ".join(t[3] for t in rec["turns"]) for rec in meta}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".wav", ".flac"))
    audio_s = sum(sf.info(p).duration for p in files)
    print(f"corpus: {len(files)} files, {audio_s:.1f} s of audio in {folder}; {os.cpu_count()} CPUs")
    only = set(args.only or ["peer", "label", "full"])
    work = WORK / "bench-speed"
    work.mkdir(parents=True, exist_ok=True)

    names = {"peer": "faster-whisper BatchedInferencePipeline", "label": "kimia-curate label-only",
             "full": "kimia-curate full local"}
    runs: dict[str, list[Run]] = defaultdict(list)
    for _ in range(args.repeat):
        if "peer" in only:
            wall, cpu, texts = run_peer(folder, work / "peer.json", args.threads)
            runs["peer"].append(Run(wall, cpu, score(refs, texts) if refs else None, []))
        for key, sets in (("label", LABEL_ONLY), ("full", [])):
            if key not in only:
                continue
            out = work / f"out-{key}"
            (wall, cpu), run = kimia(folder, out, args.config, sets + args.sets)
            texts, skipped = run_texts(out)
            if skipped and not meta:
                print(f"    {key}: {sum(map(len, skipped.values()))} segments were not transcribed (dropped by the "
                      "audio checks first); without turn timings their words count as deleted")
            mine = transcribed_refs(meta, skipped) if skipped and meta else refs
            runs[key].append(Run(wall, cpu, score(mine, texts) if refs else None, profile_lines(run, wall, audio_s),
                                 sum(map(len, skipped.values()))))

    print(f"{'run':42s} {'wall s':>8s} {'RTF':>7s} {'WER':>7s} {'x peer':>7s} {'CPU s':>8s} {'x peer':>7s}"
          + ("  wall range      CPU range" if args.repeat > 1 else ""))
    peer = runs.get("peer")
    for key in ("peer", "label", "full"):
        if key not in runs:
            continue
        mine = runs[key]
        mid = median_run(mine)
        walls, cpus = [r.wall for r in mine], [r.cpu for r in mine]
        ratio = f"{statistics.median(r.wall / p.wall for r, p in zip(mine, peer)):7.2f}" if peer else "      -"
        cpu_ratio = f"{statistics.median(r.cpu / p.cpu for r, p in zip(mine, peer)):7.2f}" if peer else "      -"
        wer_s = f"{mid.wer:7.4f}" if mid.wer is not None else "      -"
        spread = (f"  {min(walls):6.1f}-{max(walls):6.1f}  {min(cpus):6.1f}-{max(cpus):6.1f}"
                  if args.repeat > 1 else "")
        print(f"{names[key]:42s} {statistics.median(walls):8.1f} {statistics.median(walls) / audio_s:7.4f} "
              f"{wer_s} {ratio} {statistics.median(cpus):8.1f} {cpu_ratio}{spread}")
        if len({r.wer for r in mine}) > 1:
            print(f"    WER differed between rounds: {', '.join(f'{r.wer:.4f}' for r in mine)}")
        if mid.untranscribed:
            print(f"    WER over the turns it transcribed: {mid.untranscribed} segments dropped by the audio checks "
                  "were not (transcribe.kept_only)")
        for line in mid.lines:
            print(line)


if __name__ == "__main__":
    main()
