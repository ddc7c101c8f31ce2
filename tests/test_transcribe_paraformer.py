"""Paraformer-zh backend: a tiny BiCif-Paraformer in FunASR's ONNX layout, built here, run on real speech.

No Paraformer weights ship with any package, so the test builds a model directory in the
upstream layout (``model.onnx`` with FunASR's input/output names and shapes, ``config.yaml``
with tiny frontend dims, ``tokens.json``, a Kaldi ``am.mvn``) around a tiny network: random
encoder/decoder weights, and a CIF predictor whose weight reads frame energy, so that its
peaks, like a trained one's, stop in silence. The assertions are on form (characters from
the vocabulary, monotone times, text = the pause rule applied to the characters) and on the
timestamp arithmetic seeing the planted pause, never on what text comes out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kimia_model.refs import ModelNotFoundError
from stages.base import StageContext
from stages.transcribe import TRANSCRIPT_FIELDS, TranscribeConfig
from stages.transcribe_paraformer import (
    ParaformerBackend,
    apply_lfr,
    build_paraformer,
    char_times,
    check_model_dir,
    load_cmvn,
)
from stages.zh_punct import COMMA, PERIOD, punctuate_by_pauses

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")  # torch's ONNX exporter writes through it

DATA = Path(__file__).parent / "data" / "zh"
N_MELS, LFR_M, LFR_N = 8, 7, 6
VOCAB = ["<blank>", "<s>", "</s>", *"今天气很好我们去公园散步吧晚上一起吃饭", "<unk>"]


class TinyBiCifParaformer(torch.nn.Module):
    """FunASR's exported BiCif-Paraformer interface around a few random layers."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.enc = torch.nn.Parameter(torch.randn(dim, 16, generator=g) / dim**0.5)
        self.dec = torch.nn.Parameter(torch.randn(16, vocab, generator=g))
        special = torch.zeros(vocab)
        special[[0, 1, 2, vocab - 1]] = -1e4  # blank, <s>, </s>, <unk> never win
        self.register_buffer("special", special)

    def forward(self, speech: torch.Tensor, speech_lengths: torch.Tensor):  # noqa: ANN201
        t = speech.shape[1]
        mask = (torch.arange(t)[None, :] < speech_lengths[:, None].long()).float()
        # CIF weights: ~0.4 per 60 ms frame of speech, ~0 in silence (energy after CMVN).
        alphas = 0.4 * torch.sigmoid(3.0 * speech.mean(-1)) * mask
        us_alphas = torch.repeat_interleave(alphas / 3.0, 3, dim=1)
        acc = torch.cumsum(us_alphas, dim=1)
        fired = torch.floor(acc + 1e-4)
        prev = torch.cat([torch.zeros_like(fired[:, :1]), fired[:, :-1]], dim=1)
        peak = (fired > prev).float()
        us_cif_peak = peak + (1.0 - peak) * (acc - torch.floor(acc)) * 0.5
        token_num = torch.clamp(peak.sum(1) - 1.0, min=0.0).to(torch.int32)
        logits = torch.tanh(speech @ self.enc) @ self.dec + self.special
        return torch.log_softmax(logits, dim=-1), token_num, us_alphas, us_cif_peak


def make_model_dir(root: Path, *, timestamps: bool = True, tokens_txt: bool = False) -> Path:
    """A Paraformer-zh ONNX directory in FunASR's layout, with tiny dims and random weights."""
    root.mkdir(parents=True, exist_ok=True)
    dim = N_MELS * LFR_M
    model = TinyBiCifParaformer(dim, len(VOCAB)).eval()

    class TwoOutputs(torch.nn.Module):  # a plain Paraformer: no timestamp outputs
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, speech, speech_lengths):  # noqa: ANN001, ANN201
            return self.inner(speech, speech_lengths)[:2]

    outputs = ["logits", "token_num", "us_alphas", "us_cif_peak"] if timestamps else ["logits", "token_num"]
    torch.onnx.export(
        model if timestamps else TwoOutputs(),
        (torch.zeros(1, 20, dim), torch.tensor([20], dtype=torch.int32)),
        str(root / "model.onnx"),
        input_names=["speech", "speech_lengths"],
        output_names=outputs,
        dynamic_axes={"speech": {0: "batch", 1: "frames"}, "speech_lengths": {0: "batch"},
                      **{o: {0: "batch", 1: "t"} for o in outputs if o != "token_num"}, "token_num": {0: "batch"}},
        dynamo=False,
    )
    (root / "config.yaml").write_text(
        "model: BiCifParaformer\n"
        "frontend: WavFrontend\n"
        f"frontend_conf:\n  fs: 16000\n  window: hamming\n  n_mels: {N_MELS}\n  frame_length: 25\n"
        f"  frame_shift: 10\n  lfr_m: {LFR_M}\n  lfr_n: {LFR_N}\n"
        "model_conf:\n  predictor_bias: 0\n",
        encoding="utf-8",
    )
    if tokens_txt:
        (root / "tokens.txt").write_text("".join(f"{t} {i}\n" for i, t in enumerate(VOCAB)), encoding="utf-8")
    else:
        (root / "tokens.json").write_text(json.dumps(VOCAB, ensure_ascii=False), encoding="utf-8")
    shift = " ".join(["-5.0"] * dim)
    scale = " ".join(["0.2"] * dim)
    (root / "am.mvn").write_text(
        f"<Nnet>\n<Splice> {dim} {dim}\n[ 0 ]\n<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {shift} ]\n"
        f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {scale} ]\n</Nnet>\n",
        encoding="utf-8",
    )
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("paraformer") / "tiny-paraformer-zh")


@pytest.fixture(scope="module")
def clips() -> list[dict]:
    return json.loads((DATA / "clips.json").read_text(encoding="utf-8"))["clips"]


def test_loads_and_labels_real_speech_in_the_upstream_layout(model_dir: Path, clips: list[dict]) -> None:
    cfg = TranscribeConfig(paraformer_model=str(model_dir), num_cpus=1)
    asr = build_paraformer(cfg, StageContext())
    audios, rates = zip(*(sf.read(DATA / c["file"], dtype="float32") for c in clips))
    # one clip at 24 kHz: the backend resamples
    audios = list(audios)
    audios[1] = np.interp(np.arange(0, len(audios[1]), 16000 / 24000), np.arange(len(audios[1])), audios[1])
    out = asr.transcribe(audios[:1], int(rates[0])) + asr.transcribe(audios[1:2], 24000) + asr.transcribe(
        [audios[2], np.zeros(800, np.float32), audios[0]], 16000
    )
    assert len(out) == 5
    for res in out:
        assert set(TRANSCRIPT_FIELDS) <= set(res) and res["language"] == "zh"
        chars = res["chars"]
        assert all(c in VOCAB[3:-1] for c, _, _ in chars)
        starts = [s for _, s, _ in chars]
        assert starts == sorted(starts) and all(0 <= s <= e for _, s, e in chars)
        assert all(e1 <= s2 + 1e-9 for (_, _, e1), (_, s2, _) in zip(chars, chars[1:]))
        assert res["text"] == punctuate_by_pauses(chars)
    assert out[3]["text"] == "" and out[3]["chars"] == []  # 50 ms of silence: nothing, no crash
    assert out[0]["text"] == out[4]["text"] and out[0]["chars"] == out[4]["chars"]  # batch-independent
    for res, clip in zip(out[:3], clips):
        chars = res["chars"]
        assert len(chars) > 5 and chars[-1][2] <= clip["duration_s"] + 0.1
        # The timestamp arithmetic sees the planted 1.4 s silence as a pause over 1.0 s there.
        long_pause = next(p for p in clip["pauses"] if p["planted_s"] > 1.0)
        gaps = [(e1, s2) for (_, _, e1), (_, s2, _) in zip(chars, chars[1:]) if s2 - e1 > 1.0]
        assert any(e1 < long_pause["end_s"] and s2 > long_pause["start_s"] for e1, s2 in gaps), (gaps, long_pause)
        assert PERIOD in res["text"]
        assert res["compression_ratio"] > 0 and res["avg_logprob"] <= 0


def test_tokens_txt_and_quantized_name(tmp_path: Path) -> None:
    d = make_model_dir(tmp_path / "m", tokens_txt=True)
    (d / "model.onnx").rename(d / "model_quant.onnx")
    asr = ParaformerBackend(d)
    assert asr.model_id.endswith("model_quant.onnx") and asr.tokens == VOCAB
    audio, sr = sf.read(DATA / "zh_03.flac", dtype="float32")
    (res,) = asr.transcribe([audio], sr)
    assert res["chars"] and res["text"] == punctuate_by_pauses(res["chars"])


def test_missing_weights_name_file_key_and_how(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"transcribe\.paraformer_model.*funasr-export") as err:
        build_paraformer(TranscribeConfig(), StageContext())
    assert "\n" not in str(err.value)
    with pytest.raises(ModelNotFoundError, match=r"nowhere.*transcribe\.paraformer_model"):
        build_paraformer(TranscribeConfig(paraformer_model=str(tmp_path / "nowhere")), StageContext())
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("model.onnx", "config.yaml", "tokens.json"):
        (partial / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(ModelNotFoundError, match=r"partial/am\.mvn \(config key `transcribe\.paraformer_model`\)"):
        check_model_dir(partial)
    torch_release = tmp_path / "torch-release"
    torch_release.mkdir()
    (torch_release / "model.pt").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"model\.pt.*funasr-export"):
        check_model_dir(torch_release)
    # a bare name resolves under <cache_dir>/paraformer/
    cache = tmp_path / "cache"
    (cache / "paraformer").mkdir(parents=True)
    (cache / "paraformer" / "tiny").symlink_to(model_dir)
    asr = build_paraformer(TranscribeConfig(paraformer_model="tiny"), StageContext(cache_dir=cache))
    assert asr.tokens == VOCAB


def test_model_without_timestamp_outputs_is_refused(tmp_path: Path) -> None:
    d = make_model_dir(tmp_path / "plain", timestamps=False)
    with pytest.raises(ValueError, match="no timestamp outputs"):
        ParaformerBackend(d)


def _lfr_reference(x: np.ndarray, m: int, n: int) -> np.ndarray:
    # FunASR's frontend, frame by frame.
    t = x.shape[0]
    out = []
    padded = np.vstack([np.tile(x[0], ((m - 1) // 2, 1)), x])
    total = t + (m - 1) // 2
    for i in range(int(np.ceil(t / n))):
        if m <= total - i * n:
            out.append(padded[i * n : i * n + m].reshape(-1))
        else:
            frame = padded[i * n :].reshape(-1)
            for _ in range(m - (total - i * n)):
                frame = np.hstack([frame, padded[-1]])
            out.append(frame)
    return np.vstack(out)


@pytest.mark.parametrize("t", [1, 3, 6, 7, 11, 40, 101])
def test_lfr_matches_the_frame_by_frame_definition(t: int) -> None:
    x = np.random.default_rng(t).normal(size=(t, 4)).astype(np.float32)
    np.testing.assert_array_equal(apply_lfr(x, 7, 6), _lfr_reference(x, 7, 6))


def test_cmvn_and_char_times(tmp_path: Path, model_dir: Path) -> None:
    shift, scale = load_cmvn(model_dir / "am.mvn")
    assert shift.shape == scale.shape == (N_MELS * LFR_M,) and shift[0] == -5.0 and scale[0] == 0.2
    # peaks at upsampled frames 10, 20, 80 (20 ms each), 100 frames: two characters
    peaks = np.zeros(100)
    peaks[[10, 20, 80]] = 1.0
    (a, b) = char_times(peaks, 2)
    assert a == (round(8.5 * 0.02, 3), round(18.5 * 0.02, 3))
    # the second character lasts 12 frames at most: the rest of the 60 frames is silence
    assert b[0] == round(18.5 * 0.02, 3) and b[1] == round((18.5 + 12) * 0.02, 3)
    assert punctuate_by_pauses([("好", *a), ("的", *b)]) == "好的"
    peaks[[65]] = 1.0  # a 3rd character: the 2nd is cut at 18.5 + 12 frames, the 3rd starts at 63.5
    chars = [(c, *t) for c, t in zip("一二三", char_times(peaks, 3))]
    assert chars[1][2] == round(30.5 * 0.02, 3) and chars[2][1] == round(63.5 * 0.02, 3)
    assert punctuate_by_pauses(chars) == "一二" + COMMA + "三"  # a 0.66 s pause
    # too few peaks for the characters: refired from the alphas, still monotone
    times = char_times(np.zeros(90), 4, alphas=np.full(90, 0.1))
    assert len(times) == 4 and [s for s, _ in times] == sorted(s for s, _ in times)
