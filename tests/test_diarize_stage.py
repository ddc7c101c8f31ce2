"""DiarizeStage: row contract, bad input, bounded memory, the pyannote path on random weights,
and the offline backend with real packaged models on pyannote's sample."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kimia_model.refs import ModelNotFoundError
from stages.base import STATUS_EMPTY, STATUS_OK, STATUS_QUARANTINED
from stages.diarize import DiarizeConfig, DiarizeStage
from stages.diarize import backends as backends_mod
from stages.diarize.backends import RawDiarization
from stages.diarize.embedders import SpeakerEmbedder
from stages.diarize.evaluate import read_rttm, score, write_rttm
from stages.diarize.postprocess import Turn
from stages.rows import segment_views

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SR = 16000


# -- model-free stand-ins that still depend on the audio -------------------------------------------


class EnergyVAD:
    """Speech = 20 ms frames above an energy floor; pauses under 0.3 s do not split."""

    def __init__(self) -> None:
        self.calls = 0

    def speech_regions(self, audio, sample_rate, **_kw):
        self.calls += 1
        hop = sample_rate // 50
        n = audio.size // hop
        if n == 0:
            return []
        e = (audio[: n * hop].reshape(n, hop) ** 2).mean(axis=1)
        on = np.flatnonzero(e > 1e-4)
        regions: list[list[float]] = []
        for f in on:
            t = f * hop / sample_rate
            if regions and t - regions[-1][1] < 0.3:
                regions[-1][1] = t + hop / sample_rate
            else:
                regions.append([t, t + hop / sample_rate])
        return [(a, b) for a, b in regions if b - a >= 0.25]


class SpectrumEmbedder(SpeakerEmbedder):
    """Log band energies of the average spectrum: tells our synthetic 'voices' (different
    fundamentals) apart. Records batch sizes to check that extraction is streamed."""

    model_id = "test:spectrum"
    dim = 32

    def __init__(self) -> None:
        self.batches: list[int] = []

    def _embed_equal(self, batch):
        self.batches.append(batch.shape[0])
        spec = np.abs(np.fft.rfft(batch, n=1024 * max(1, batch.shape[1] // 1024), axis=1))
        bands = np.array_split(spec[:, : spec.shape[1] // 2], self.dim, axis=1)
        feats = np.log(np.stack([b.mean(axis=1) for b in bands], axis=1) + 1e-6)
        return feats - feats.mean(axis=1, keepdims=True)


def voice(f0: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    return (0.2 * x + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def conversation(turns: list[tuple[float, float, float]], total: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    audio = np.zeros(int(total * SR), np.float32)
    for start, dur, f0 in turns:
        s = int(start * SR)
        audio[s : s + int(dur * SR)] += voice(f0, dur, rng)
    return audio


def recording(audio: np.ndarray, sr: int = SR, **extra) -> dict:
    return {
        "recording_id": "rec1",
        "source": "/x/rec1.wav",
        "status": STATUS_OK,
        "sample_rate": sr,
        "duration_s": audio.size / sr,
        "audio": audio,
        "source_meta": {"lang": "en"},
        "loudness_lufs": -23.0,
        "provenance": {"decode": {"model": "none", "config_hash": "abc"}},
        "timings": {"decode": 0.1},
        **extra,
    }


def views(recordings: list[dict]) -> list[dict]:
    """What the next stage sees: each segment as a view of its recording, or the recording itself."""
    out: list[dict] = []
    for rec in recordings:
        out.extend(segment_views(rec) if rec.get("status") == STATUS_OK else [rec])
    return out


def stage(**over) -> DiarizeStage:
    cfg = DiarizeConfig(**{"min_segment_s": 0.3, **over})
    return DiarizeStage(cfg, vad=EnergyVAD(), embedder=SpectrumEmbedder())


# -- row contract ------------------------------------------------------------------------------------


def test_segments_follow_the_row_contract():
    # A (120 Hz) 0.5-4.5, B (300 Hz) 5-8, A 8.5-10, C (700 Hz) 13-16
    audio = conversation([(0.5, 4.0, 120), (5.0, 3.0, 300), (8.5, 1.5, 120), (13.0, 3.0, 700)], 17.0)
    enhanced = audio * 0.5
    rows = views(stage()([recording(audio, audio_enhanced=enhanced)]))
    assert all(r["status"] == STATUS_OK for r in rows)
    assert [r["segment_index"] for r in rows] == list(range(len(rows)))
    assert [r["speaker"] for r in rows] == ["S0", "S1", "S0", "S2"]
    starts = [r["start_s"] for r in rows]
    assert starts == sorted(starts)
    for r, (s, e) in zip(rows, [(0.5, 4.5), (5.0, 8.0), (8.5, 10.0), (13.0, 16.0)], strict=True):
        assert abs(r["start_s"] - s) < 0.3 and abs(r["end_s"] - e) < 0.3
        a, b = round(r["start_s"] * SR), round(r["end_s"] * SR)
        assert np.array_equal(r["audio"], audio[a:b])  # cut at sample boundaries
        assert np.array_equal(r["audio_enhanced"], enhanced[a:b])
        assert r["duration_s"] == pytest.approx((b - a) / SR)
        assert r["recording_duration_s"] == pytest.approx(17.0)
        assert r["recording_id"] == "rec1" and r["source_meta"] == {"lang": "en"}
        assert r["loudness_lufs"] == -23.0 and r["sample_rate"] == SR
        assert r["overlap"] is False and r["overlap_s"] == 0.0
    (rec,) = stage()([recording(audio, audio_enhanced=enhanced)])
    assert set(rec["provenance"]) == {"decode", "diarize"} and "diarize" in rec["timings"]
    assert all(set(seg) == {"segment_index", "start_s", "end_s", "speaker", "status", "overlap", "overlap_s",
                            "clean_cut", "speaker_purity", "single_speaker"}
               for seg in rec["segments"])  # offsets and labels: the audio stays with the recording
    assert all(seg["clean_cut"] and seg["single_speaker"] for seg in rec["segments"])


def test_other_sample_rate_and_enhanced_stream():
    a16 = conversation([(0.5, 3.0, 120), (4.0, 3.0, 400)], 8.0)
    from kimia_model.audio import resample

    a24 = resample(a16, SR, 24000)
    silent = np.zeros_like(a24)  # the original stream is silent, the enhanced one is not
    # 6 s of speech is below the default min_windows_to_split; this test is about rates and streams.
    rows = views(stage(input_stream="enhanced", min_windows_to_split=2)([recording(silent, 24000, audio_enhanced=a24)]))
    assert [r["speaker"] for r in rows] == ["S0", "S1"]
    r = rows[1]
    a, b = round(r["start_s"] * 24000), round(r["end_s"] * 24000)
    assert r["audio"].size == b - a and np.array_equal(r["audio_enhanced"], a24[a:b])


def test_too_little_speech_to_count_speakers_is_one_speaker():
    """Two voices in 6 s of speech: too few windows to count speakers, so one speaker, not five."""
    a16 = conversation([(0.5, 3.0, 120), (4.0, 3.0, 400)], 8.0)
    assert {r["speaker"] for r in views(stage()([recording(a16)]))} == {"S0"}
    assert {r["speaker"] for r in views(stage(min_windows_to_split=2)([recording(a16)]))} == {"S0", "S1"}


def test_no_speech_gives_one_empty_row():
    for audio in (np.zeros(SR * 5, np.float32), np.zeros(0, np.float32)):
        rows = views(stage()([recording(audio)]))
        assert len(rows) == 1
        assert rows[0]["status"] == STATUS_EMPTY and rows[0]["reason"] == "no speech"
        assert rows[0]["recording_id"] == "rec1" and "audio" not in rows[0]


def test_single_word_and_short_segments():
    word = conversation([(1.0, 0.6, 200)], 3.0)
    rows = views(stage()([recording(word)]))
    assert len(rows) == 1 and rows[0]["speaker"] == "S0"
    # shorter than min_segment_s: not emitted, the recording is marked empty with the reason
    rows = views(stage(min_segment_s=1.0)([recording(word)]))
    assert rows[0]["status"] == STATUS_EMPTY and "1.0 s" in rows[0]["reason"]


@pytest.mark.parametrize(
    ("audio", "extra", "msg"),
    [
        (np.full(SR, np.nan, np.float32), {}, "NaN"),
        (np.zeros((SR, 2), np.float32), {}, "mono"),
        (np.zeros(SR, np.int16), {}, "float"),
    ],
)
def test_bad_input_is_quarantined(audio, extra, msg):
    rows = views(stage()([recording(audio, **extra)]))
    assert rows[0]["status"] == STATUS_QUARANTINED and msg in rows[0]["error"]
    assert rows[0]["failed_stage"] == "diarize"


def test_enhanced_stream_missing_is_quarantined_and_others_survive():
    good = recording(conversation([(0.5, 2.0, 150)], 3.0), audio_enhanced=np.zeros(3 * SR, np.float32))
    bad = {**recording(conversation([(0.5, 2.0, 150)], 3.0)), "recording_id": "rec2"}
    rows = views(stage(input_stream="enhanced")([good, bad]))
    by = {r["recording_id"]: r for r in rows}
    assert by["rec2"]["status"] == STATUS_QUARANTINED and "audio_enhanced" in by["rec2"]["error"]
    assert by["rec1"]["status"] == STATUS_EMPTY  # its enhanced stream is silent


class FixedBackend:
    def __init__(self, turns):
        self.turns = turns

    def diarize(self, audio):
        return RawDiarization(list(self.turns), [], {})


def test_overlap_flag_and_exclude():
    audio = conversation([(0.0, 6.0, 120), (4.0, 4.0, 400)], 9.0)
    turns = [Turn(0.0, 6.0, 0), Turn(4.0, 8.0, 1)]
    post_off = dict(merge_clusters=False, reassign_chunks=False)
    st = stage(**post_off)
    st.setup()
    st._ready = True
    st.backend = FixedBackend(turns)
    rows = views(st([recording(audio)]))
    assert [(r["speaker"], r["overlap"], round(r["overlap_s"], 3)) for r in rows] == [("S0", True, 2.0), ("S1", True, 2.0)]
    st2 = stage(overlap="exclude", **post_off)
    st2.setup()
    st2._ready = True
    st2.backend = FixedBackend(turns)
    rows = views(st2([recording(audio)]))
    # Edges at a pause move 30 ms into it (the cut sample is silence): compare to 0.1 s.
    assert [(round(r["start_s"], 1), round(r["end_s"], 1), r["overlap"]) for r in rows] == [
        (0.0, 4.0, False), (6.0, 8.0, False)
    ]  # fmt: skip


def test_long_input_streams_embeddings_and_caps_the_affinity_matrix(monkeypatch):
    # 6 minutes of alternating speakers: hundreds of windows; extraction must run in batches of
    # embed_batch_size and spectral clustering must see at most max_cluster_windows windows.
    turns = [(t, 2.5, (120, 400)[i % 2]) for i, t in enumerate(np.arange(0.5, 357.0, 3.0))]
    audio = conversation(turns, 360.0)
    seen: list[int] = []
    real = backends_mod.spectral_cluster

    def spy(x, *a, **k):
        seen.append(x.shape[0])
        return real(x, *a, **k)

    monkeypatch.setattr(backends_mod, "spectral_cluster", spy)
    st = stage(embed_batch_size=16, max_cluster_windows=60)
    rows = views(st([recording(audio)]))
    assert max(st.embedder.batches) <= 16 and sum(st.embedder.batches) > 300
    assert seen and max(seen) <= 60
    assert {r["speaker"] for r in rows} == {"S0", "S1"}
    assert all(r["duration_s"] <= 27.0 + 1e-6 for r in rows)


# -- evaluation helpers ------------------------------------------------------------------------------


def test_rttm_roundtrip_and_scores(tmp_path):
    ref = [(0.0, 5.0, "a"), (5.0, 9.0, "b")]
    write_rttm(tmp_path / "x.rttm", "x", ref)
    assert read_rttm(tmp_path / "x.rttm") == {"x": ref}
    assert score(ref, [(0.0, 5.0, "S1"), (5.0, 9.0, "S0")])["der"] == pytest.approx(0.0)  # labels mapped
    s = score(ref, [(0.0, 9.0, "S0")], collar=0.0)
    assert s["confusion"] == pytest.approx(4 / 9) and s["hyp_speakers"] == 1
    assert score(ref, [], collar=0.0)["miss"] == pytest.approx(1.0)
    (tmp_path / "bad.rttm").write_text("SPEAKER x 1 zero 1 <NA> <NA> a <NA> <NA>\n")
    with pytest.raises(ValueError, match="bad.rttm:1"):
        read_rttm(tmp_path / "bad.rttm")


# -- pyannote backend on random weights, upstream layout ---------------------------------------------


def _save_pyannote_model(model, folder: Path) -> None:
    """Write ``pytorch_model.bin`` the way a pyannote checkpoint on the hub is laid out."""
    import lightning
    import pyannote.audio
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": lightning.__version__,
            "pyannote.audio": {
                "versions": {"pyannote.audio": pyannote.audio.__version__},
                "architecture": {"module": type(model).__module__, "class": type(model).__name__},
                "specifications": model.specifications,
            },
        },
        folder / "pytorch_model.bin",
    )


def build_random_pyannote_pipeline(root: Path, layout: str = "community-1") -> Path:
    """A pyannote pipeline directory with random weights.

    ``community-1``: config.yaml with ``$model/...`` + segmentation/ embedding/ plda/.
    ``3.1``: config.yaml naming hub ids + segmentation/ embedding/ sub-folders, agglomerative
    clustering (no PLDA).
    """
    import torch
    import yaml
    from pyannote.audio.core.task import Problem, Resolution, Specifications
    from pyannote.audio.models.embedding import WeSpeakerResNet34
    from pyannote.audio.models.segmentation import PyanNet

    torch.manual_seed(0)
    seg = PyanNet(sincnet={"stride": 10})
    seg.specifications = Specifications(
        problem=Problem.MONO_LABEL_CLASSIFICATION, resolution=Resolution.FRAME, duration=5.0, min_duration=5.0,
        warm_up=(0.0, 0.0), classes=["s1", "s2", "s3"], powerset_max_classes=2, permutation_invariant=True,
    )  # fmt: skip
    seg.build()
    emb = WeSpeakerResNet34()
    emb.specifications = Specifications(problem=Problem.REPRESENTATION, resolution=Resolution.CHUNK, duration=3.0)
    _save_pyannote_model(seg.eval(), root / "segmentation")
    _save_pyannote_model(emb.eval(), root / "embedding")
    common = {"embedding_batch_size": 32, "segmentation_batch_size": 32, "embedding_exclude_overlap": True}
    if layout == "community-1":
        rng = np.random.default_rng(0)
        (root / "plda").mkdir()
        np.savez(root / "plda" / "xvec_transform.npz", mean1=rng.standard_normal(256),
                 mean2=rng.standard_normal(128), lda=rng.standard_normal((256, 128)))  # fmt: skip
        q, _ = np.linalg.qr(rng.standard_normal((128, 128)))
        np.savez(root / "plda" / "plda.npz", mu=rng.standard_normal(128), tr=q, psi=rng.uniform(0.5, 2, 128))
        params = {"clustering": "VBxClustering", "segmentation": "$model/segmentation",
                  "embedding": "$model/embedding", "plda": "$model/plda", **common}  # fmt: skip
        tuned = {"clustering": {"threshold": 0.6, "Fa": 0.07, "Fb": 0.8}, "segmentation": {"min_duration_off": 0.0}}
    else:
        params = {"clustering": "AgglomerativeClustering", "segmentation": "pyannote/segmentation-3.0",
                  "embedding": "pyannote/wespeaker-voxceleb-resnet34-LM", **common}  # fmt: skip
        tuned = {"clustering": {"method": "centroid", "min_cluster_size": 12, "threshold": 0.7045654963945799},
                 "segmentation": {"min_duration_off": 0.0}}  # fmt: skip
    config = {"version": "3.1.0", "pipeline": {"name": "pyannote.audio.pipelines.SpeakerDiarization",
                                              "params": params}, "params": tuned}  # fmt: skip
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def random_pipeline(tmp_path_factory) -> Path:
    return build_random_pyannote_pipeline(tmp_path_factory.mktemp("community1"))


def test_check_names_missing_pipeline_dir(tmp_path):
    missing_dir = tmp_path / "nowhere" / "speaker-diarization-community-1"
    st = DiarizeStage(DiarizeConfig(backend="pyannote", model=str(missing_dir)))
    with pytest.raises(ModelNotFoundError) as exc:
        st.check()
    msg = str(exc.value)
    assert str(missing_dir) in msg and "diarize.model" in msg and "huggingface-cli download" in msg
    with pytest.raises(ModelNotFoundError, match="HF_TOKEN"):
        DiarizeStage(DiarizeConfig(backend="pyannote", model="pyannote/speaker-diarization-community-1")).check()
    st = DiarizeStage(DiarizeConfig(embedding="speechbrain", embedding_model=str(tmp_path / "ecapa")))
    with pytest.raises(ModelNotFoundError, match="diarize.embedding_model"):
        st.check()


def test_pyannote_backend_runs_from_random_weights(random_pipeline):
    import torch

    torch.set_num_threads(1)
    cfg = DiarizeConfig(
        backend="pyannote", model=str(random_pipeline), segmentation_step=0.5, pyannote_batch_size=8,
        embedding="pyannote", embedding_model=str(random_pipeline / "embedding"), min_segment_s=0.0,
    )  # fmt: skip
    st = DiarizeStage(cfg)
    st.check()
    audio = conversation([(0.2, 2.5, 120), (3.0, 2.5, 400)], 6.0)
    recs = st([recording(audio)])
    rows = views(recs)
    assert rows and all(r["status"] in (STATUS_OK, STATUS_EMPTY) for r in rows)
    ok = [r for r in rows if r["status"] == STATUS_OK]
    for r in ok:
        a, b = round(r["start_s"] * SR), round(r["end_s"] * SR)
        assert np.array_equal(r["audio"], audio[a:b]) and r["speaker"].startswith("S")
    assert st.embedder.dim == 256 and "pyannote:" in recs[0]["provenance"]["diarize"]["model"]


def test_pyannote_31_layout_loads_and_reports_missing_subfolder(tmp_path):
    from stages.diarize.backends import PyannoteBackend

    root = build_random_pyannote_pipeline(tmp_path / "p31", layout="3.1")
    be = PyannoteBackend(str(root), segmentation_step=0.5, embedding_batch_size=8, segmentation_batch_size=8)
    assert be.pipeline.klustering == "AgglomerativeClustering"
    (root / "embedding" / "pytorch_model.bin").unlink()
    with pytest.raises(ModelNotFoundError, match="embedding/pytorch_model.bin"):
        PyannoteBackend(str(root))


# -- the real offline models on real speech ------------------------------------------------------------


def test_offline_backend_on_pyannote_sample(tmp_path):
    """Acceptance: silero-vad + resemblyzer + post-processing, DER <= 20 % (collar 0.25 s), 2 speakers."""
    import pyannote.audio
    import torch

    from stages.diarize import eval_diarization

    torch.set_num_threads(1)
    sample = Path(pyannote.audio.__file__).parent / "sample"
    report = eval_diarization(sample / "sample.rttm", sample / "sample.wav", DiarizeConfig(), tmp_path)
    total = report["total"]
    assert total["der"] <= 0.20, total
    assert report["files"][0]["hyp_speakers"] == 2
    assert (tmp_path / "sample.rttm").read_text().startswith("SPEAKER sample 1 ")
    assert (tmp_path / "metrics.json").exists()


# -- speechbrain ECAPA from a local directory in the upstream layout ------------------------------

_SB_YAML = """\
pretrained_path: speechbrain/spkrec-ecapa-voxceleb
n_mels: 80
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False
embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [16, 16, 16, 16, 48]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 8
    lin_neurons: 24
modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
"""


def test_speechbrain_embedder_loads_local_upstream_layout(tmp_path):
    """Same yaml shape as speechbrain/spkrec-ecapa-voxceleb (hub id in pretrained_path), tiny sizes."""
    import torch
    from hyperpyyaml import load_hyperpyyaml

    from stages.diarize.embedders import build_embedder

    model_dir = tmp_path / "spkrec-ecapa-voxceleb"
    model_dir.mkdir()
    (model_dir / "hyperparams.yaml").write_text(_SB_YAML)
    torch.manual_seed(0)
    ref = load_hyperpyyaml(_SB_YAML)
    torch.save(ref["embedding_model"].state_dict(), model_dir / "embedding_model.ckpt")
    emb = build_embedder("speechbrain", str(model_dir), cache_dir=tmp_path / "cache")
    wav = conversation([(0.0, 1.0, 200)], 1.0)
    got = emb.embed([wav, wav[:8000]])
    assert got.shape == (2, 24) and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    with torch.inference_mode():  # the saved random weights, not fresh ones, were loaded
        feats = ref["mean_var_norm"](ref["compute_features"](torch.from_numpy(wav)[None]), torch.ones(1))
        want = ref["embedding_model"].eval()(feats).reshape(-1).numpy()
    assert np.allclose(got[0], want / np.linalg.norm(want), atol=1e-4)
