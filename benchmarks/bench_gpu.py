"""The GPU recipe (``configs/kimi_audio.yaml``) on one GPU, stage by stage; a CPU smoke run without one.

Why: the recipe is written for a cluster (``ray.address: auto``, several GPUs' worth of
actors), and its precision and attention kernels are chosen per machine (bf16/fp16 and
flash-attn or SDPA where the GPU and packages allow). Before renting GPUs for a corpus, this
says on one of them how fast each stage is and which numerics each model stage actually ran
with, as the run recorded them (``runtimes`` in ``OUT/run/manifest.json``). Without CUDA, or
with ``--cpu``, it runs the same recipe on CPU with small models so CI keeps the script and
the recipe working; those figures are a smoke test, never a GPU figure, and it says so.

What it runs: ``kimia-curate run`` on a generated espeak-ng corpus (``benchmarks/corpus.py``)
or ``--input``, as a whole process (start-up and model loads counted), with overrides that put
every enabled stage on this machine: embedded Ray, one worker per GPU stage sharing the one
GPU in equal fractions, CPU reservations scaled to the cores there are (Ray's bookkeeping
only). In the CPU run every weight under ``/mnt/models`` is swapped for a small one: the
pip-shipped Whisper base (transcribe, features, round-trip ASR) and offline diarizer
(silero-vad + resemblyzer: pyannote ships no weights), and, for the formats no package ships,
tiny random checkpoints written in the upstream layout into ``OUT/work/models`` (an
identity-mask BSRNN, a GLM-4-Voice Whisper+VQ tokenizer, a Kimi-Audio detokenizer). Printed:
the device, each model stage's device/dtype/attention, each stage's busy time, real-time
factor and share of wall time, the framework overhead, total wall and RTF.

    .venv/bin/python benchmarks/bench_gpu.py                     # GPU: ~5 min of generated speech
    .venv/bin/python benchmarks/bench_gpu.py --input DIR --set transcribe.batch_size=16
    .venv/bin/python benchmarks/bench_gpu.py --cpu               # CPU smoke run, ~0.5 min of speech

One run each, on whatever else the machine is doing: repeat before comparing small differences.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # factories: the tiny upstream-layout checkpoints

from bench_speed import kimia, profile_lines  # noqa: E402
from corpus import WORK, make_corpus  # noqa: E402

from kimia_model.refs import default_cache_dir  # noqa: E402
from pipeline.config import RunConfig, load_config  # noqa: E402
from pipeline.run import plan_stages  # noqa: E402
from stages.base import Stage, StageContext  # noqa: E402

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3")


def device_line(use_gpu: bool) -> str:
    """What the figures were measured on, in one line."""
    import torch

    if use_gpu:
        from kimia_model.kimia_lm import flash_attn_available

        props = torch.cuda.get_device_properties(0)
        return (f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
                f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}, flash-attn "
                f"{'installed' if flash_attn_available() else 'not installed'}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}"


def one_machine_overrides(cfg: RunConfig, gpus: int, cpus: int) -> list[str]:
    """``--set`` overrides that place every enabled stage of ``cfg`` on this one machine.

    GPU stages get one worker each and an equal share of the GPU (none without one); CPU-only
    model pools get at most their share of the cores; then every reservation is scaled down
    until the pools and the biggest task fit in 90 % of the cores, as ``pipeline.run``'s
    resource check demands. Reservations are Ray's bookkeeping, not thread caps.
    """
    stages = plan_stages(cfg, StageContext())
    on_gpu = [s for s in stages if s.config.num_gpus > 0]
    models = [s for s in stages if s.uses_model]
    share = math.floor(100 / len(on_gpu)) / 100 if on_gpu else 0.0
    sets = ["ray.address=null", f"device={'cuda' if gpus else 'cpu'}"]
    workers: dict[str, int] = {}
    # A section two stages share (quality and quality_text) is set by the first, its model stage.
    firsts: dict[str, Stage] = {}
    for s in stages:
        firsts.setdefault(s.config_section(), s)
    stages = list(firsts.values())
    for s in stages:
        section = s.config_section()
        if s in on_gpu:
            workers[section] = 1
            sets.append(f"{section}.num_gpus={share if gpus else 0}")
        else:
            workers[section] = min(s.config.num_workers, max(1, cpus // max(1, len(models))))
        if section != "write":  # the writer is a task, one per batch
            sets.append(f"{section}.num_workers={workers[section]}")
    held = sum(s.config.num_cpus * workers[s.config_section()] for s in models)
    tasks = max((s.config.num_cpus for s in stages if not s.uses_model), default=0.0)
    scale = min(1.0, 0.9 * cpus / (held + tasks)) if held + tasks else 1.0
    if scale < 1.0:
        sets += [f"{s.config_section()}.num_cpus={max(0.01, math.floor(100 * s.config.num_cpus * scale) / 100)}"
                 for s in stages]
    return sets


def small_model_overrides(cfg: RunConfig, models_dir: Path) -> tuple[list[str], list[str]]:
    """Overrides that swap every staged weight of ``cfg`` for a small local one, and what each is.

    A weight is staged when its path lies under ``models.cache_dir`` (``/mnt/models/...`` in
    the recipe). Tiny checkpoints are written into ``models_dir`` by ``tests/factories.py``, in
    the layout the real ones ship in, so the recipe's loaders run; they are random (the BSRNN's
    masks set to pass audio through), so what they output means nothing.

    Raises:
        SystemExit: a staged weight that has no small stand-in here.
    """
    import torch
    from factories import identity_masks_, random_tiny_detokenizer, tiny_bsrnn, write_glm_tokenizer

    from kimia_model.bsrnn import save_checkpoint
    from kimia_model.detokenizer import save_pretrained

    def bsrnn() -> Path:
        torch.manual_seed(0)
        return save_checkpoint(identity_masks_(tiny_bsrnn()), models_dir / "bsrnn-tiny")

    whisper_base = (lambda: "pkg:whisper-base", [], "Whisper base, CTranslate2 (pip-shipped)")
    # key: (value maker, further overrides, what it is)
    stand_ins: dict[str, tuple[Any, list[str], str]] = {
        "enhance.model": (bsrnn, [], "tiny random BSRNN (identity masks: every layer runs, audio passes through)"),
        "diarize.model": (lambda: "''", ["diarize.backend=offline"],
                          "backend offline: silero-vad + resemblyzer (pip-shipped; no package ships pyannote's weights)"),
        "diarize.embedding_model": (lambda: "''", ["diarize.embedding=resemblyzer"], "resemblyzer (pip-shipped)"),
        "transcribe.model": whisper_base,
        "tokenize.model": (lambda: write_glm_tokenizer(models_dir / "glm-4-voice-tokenizer-tiny"), [],
                           "tiny random GLM-4-Voice Whisper+VQ tokenizer (64 codes)"),
        "tokenize.features_model": (lambda: "pkg:whisper-base", [], "Whisper base encoder (pip-shipped)"),
        "roundtrip.detokenizer_model": (
            lambda: save_pretrained(random_tiny_detokenizer(), models_dir / "kimi-audio-detokenizer-tiny"), [],
            "tiny random Kimi-Audio detokenizer + BigVGAN"),
        "roundtrip.asr.model": whisper_base,
    }
    staged_root = str(Path(cfg.models.cache_dir).expanduser())
    sets, notes = [], []
    if not Path(staged_root).is_dir():
        sets.append(f"models.cache_dir={default_cache_dir()}")  # where pkg: weights are assembled
    models_dir.mkdir(parents=True, exist_ok=True)
    for key, value in _flat(cfg.model_dump(mode="json")):
        if key == "models.cache_dir" or not (isinstance(value, str) and value.startswith(staged_root)):
            continue
        if key not in stand_ins:
            raise SystemExit(f"bench_gpu --cpu: no small stand-in for {key}={value}; pass --set {key}=... "
                             "or add one to small_model_overrides")
        make, more, what = stand_ins[key]
        sets += [f"{key}={make()}", *more]
        notes.append(f"    {key:28s} {what}")
    return sets, notes


def _flat(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        out += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return out


def runtime_lines(run: dict[str, Any], model_stages: list[str]) -> list[str]:
    """Per model stage, the device, dtype and attention its segments were processed with."""
    by_stage: dict[str, list[str]] = {}
    for label, n in (run.get("runtimes") or {}).items():
        stage, runtime = label.split(": ", 1)
        by_stage.setdefault(stage, []).append(f"{runtime}  [{n} segment{'' if n == 1 else 's'}]")
    return [f"    {name:11s} " + ("; ".join(by_stage[name]) if name in by_stage else "(nothing recorded)")
            for name in model_stages]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "kimi_audio.yaml",
                    help="the recipe to run (default configs/kimi_audio.yaml)")
    ap.add_argument("--input", type=Path, default=None,
                    help="a folder of audio files instead of the generated espeak-ng corpus")
    ap.add_argument("--minutes", type=float, default=None,
                    help="size of the generated corpus in minutes (default 5 on a GPU, 0.5 with --cpu)")
    ap.add_argument("--seed", type=int, default=13, help="seed of the generated corpus")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied last (repeatable), as `kimia-curate run --set`")
    ap.add_argument("--cpu", action="store_true",
                    help="CPU smoke run with small models even when CUDA is present (what CI runs)")
    ap.add_argument("--out", type=Path, default=WORK / "bench-gpu",
                    help="scratch folder: the run's output in OUT/run, tiny checkpoints in OUT/work "
                    "(default benchmarks/_work/bench-gpu)")
    args = ap.parse_args()

    import soundfile as sf
    import torch

    use_gpu = torch.cuda.is_available() and not args.cpu
    if use_gpu and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"  # one GPU: the embedded Ray sees only the first
    if args.input:
        folder = args.input
    else:
        minutes = args.minutes or (5.0 if use_gpu else 0.5)
        folder, _ = make_corpus(minutes=minutes, seed=args.seed, name=f"gpu-{minutes:g}min-{args.seed}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise SystemExit(f"bench_gpu: no audio files in {folder}")
    audio_s = sum(sf.info(p).duration for p in files)

    cfg = load_config(args.config)
    sets = one_machine_overrides(cfg, 1 if use_gpu else 0, os.cpu_count() or 1)
    notes: list[str] = []
    if not use_gpu:
        small, notes = small_model_overrides(cfg, args.out / "work" / "models")
        sets += small
    sets += args.sets
    planned = plan_stages(load_config(args.config, sets), StageContext())

    if use_gpu:
        print(f"bench_gpu: {args.config.name} on one GPU")
    else:
        why = "--cpu" if args.cpu else "no CUDA device"
        print(f"bench_gpu: CPU SMOKE RUN ({why}) of {args.config.name} with small models: "
              "NOT a GPU figure, only proof that the recipe runs")
    print(device_line(use_gpu))
    print(f"corpus: {len(files)} files, {audio_s:.1f} s of audio in {folder}")
    print("overrides: " + " ".join(sets))
    if notes:
        print("small models in place of the staged weights:")
        print("\n".join(notes))

    out = args.out / "run"
    (wall, cpu_s), run = kimia(folder, out, args.config, sets)
    inner = run.get("wall_seconds") or 0.0
    print(f"stages: {', '.join(s.name for s in planned)}")
    print("model stages ran as (device dtype attention):")
    print("\n".join(runtime_lines(run, [s.name for s in planned if s.uses_model])))
    print("per stage (busy time, real-time factor, share of the run's wall time):")
    prof = run.get("profile") or {}
    ordered = {s.name: prof["stages"][s.name] for s in planned if s.name in (prof.get("stages") or {})}
    print("\n".join(profile_lines({**run, "profile": {**prof, "stages": ordered}}, wall, audio_s)))
    print(f"total: wall {wall:.1f} s (the run's own {inner:.1f} s), RTF {wall / audio_s:.4f} on {audio_s:.1f} s of audio, "
          f"CPU {cpu_s:.1f} s; output in {out}")
    if not use_gpu:
        print("(CPU smoke run with small models: these timings say nothing about the GPU recipe's speed)")


if __name__ == "__main__":
    main()
