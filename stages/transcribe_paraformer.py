"""Paraformer-zh (FunASR) as the Mandarin labeller, with character timestamps and pause punctuation.

Kimi-Audio labels Mandarin with Paraformer-zh and punctuates it from the pauses between the
characters it timestamps (:mod:`stages.zh_punct`). This backend runs the model directory in
the layout FunASR's ONNX export ships (the ModelScope ``...-onnx`` releases, or
``funasr-export`` of a ``model.pt`` release):

* ``model_quant.onnx`` (preferred) or ``model.onnx``: the BiCif-Paraformer graph, inputs
  ``speech`` ``[B, T, n_mels*lfr_m]`` float32 and ``speech_lengths`` ``[B]`` int32, outputs
  ``logits`` ``[B, N, V]``, ``token_num`` ``[B]``, ``us_alphas`` and ``us_cif_peak``
  ``[B, 3*T]`` (the upsampled second CIF, whose peaks mark where characters start);
* ``config.yaml``: ``frontend_conf`` (fbank and low-frame-rate settings) and
  ``model_conf.predictor_bias``;
* ``tokens.json`` (a JSON list) or ``tokens.txt`` (one token a line, optionally ``token id``);
* ``am.mvn``: the global CMVN in Kaldi nnet text form (``<AddShift>``, ``<Rescale>``).

The runtime is onnxruntime plus kaldi-native-fbank, the same pair FunASR's own ONNX runtime
uses; it is reimplemented here (about a hundred lines) rather than taken from ``funasr-onnx``
because that package pins ``numpy<=1.26.4``, and the torch ``funasr`` package pulls a model
hub client and a training stack. Character times follow FunASR's standard post-processing of
``us_cif_peak`` (60 ms low-frame-rate frames upsampled three times, a shift of -1.5 frames, a
character lasting at most 12 upsampled frames, the rest of a long stretch being silence), so
the pauses :func:`stages.zh_punct.punctuate_by_pauses` measures are the ones FunASR reports.

Per clip the backend returns the :data:`stages.transcribe.TRANSCRIPT_FIELDS` plus ``chars``:
``[(char, start_s, end_s), ...]``. ``language`` is always ``zh`` and ``language_prob`` None
(the model has no language head); ``avg_logprob`` is the mean log-probability of the chosen
tokens; ``no_speech_prob`` is None (no such head).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kimia_model.audio import resample
from kimia_model.ort_session import onnx_session
from kimia_model.refs import ModelNotFoundError, missing
from stages.base import StageContext
from stages.textnorm import compression_ratio
from stages.zh_punct import punctuate_by_pauses

ASR_SAMPLE_RATE = 16000


class ParaformerSettings(Protocol):
    """The transcribe section's fields this module reads (``stages.transcribe.TranscribeConfig``;
    named structurally so that the transcribe stage can import this module, not the reverse)."""

    paraformer_model: str | None
    cpu_threads: int
    num_cpus: float

CONFIG_KEY = "transcribe.paraformer_model"
MODEL_FILES = ("model_quant.onnx", "model.onnx")
TOKEN_FILES = ("tokens.json", "tokens.txt")
HOW = (
    "Stage a FunASR Paraformer-zh ONNX directory with timestamps (model_quant.onnx or model.onnx, "
    "config.yaml, tokens.json, am.mvn), e.g. ModelScope's "
    "iic/speech_paraformer-large-vad-punc_asr_nat-zh-cn-16k-common-vocab8404-onnx, or export a model.pt "
    "release with `funasr-export ++model=DIR ++type=onnx ++quantize=true` on a machine with funasr; "
    "copy it here and set transcribe.paraformer_model to its path."
)
# FunASR's standard timestamp post-processing of the upsampled CIF peaks.
_TIME_RATE = 10.0 * 6 / 1000 / 3  # seconds per upsampled frame: 60 ms LFR frames, upsampled x3
_SHIFT = -1.5  # frames: the second CIF fires slightly after a character starts
_MAX_TOKEN_FRAMES = 12  # a character lasts at most this many frames; the rest is silence
_PEAK = 1.0 - 1e-4
_BLANK, _SOS, _EOS = 0, 1, 2


def check_model_dir(path: Path, config_key: str = CONFIG_KEY) -> Path:
    """The ONNX file to load from ``path``, or the one-line error naming what is missing."""
    if not path.is_dir():
        raise missing(path, config_key, HOW)
    model = next((path / m for m in MODEL_FILES if (path / m).is_file()), None)
    if model is None:
        if (path / "model.pt").is_file():
            raise ModelNotFoundError(
                f"model weights not found: {path / 'model.onnx'} (config key `{config_key}`): {path} holds the "
                "PyTorch release (model.pt), which this backend does not run. Export it with `funasr-export "
                "++model=DIR ++type=onnx ++quantize=true` on a machine with funasr, or stage the -onnx release."
            )
        raise missing(path / "model_quant.onnx", config_key, HOW)
    for name in ("config.yaml", "am.mvn"):
        if not (path / name).is_file():
            raise missing(path / name, config_key, HOW)
    if not any((path / t).is_file() for t in TOKEN_FILES):
        raise missing(path / "tokens.json", config_key, HOW)
    return model


def load_cmvn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(shift, scale)`` from a Kaldi nnet ``am.mvn``: features become ``(x + shift) * scale``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    vectors: dict[str, np.ndarray] = {}
    for i, line in enumerate(lines[:-1]):
        head = line.split()
        nxt = lines[i + 1].split()
        if head and head[0] in ("<AddShift>", "<Rescale>") and nxt and nxt[0] == "<LearnRateCoef>":
            vectors[head[0]] = np.array(nxt[3:-1], dtype=np.float64)  # between "[" and "]"
    if "<AddShift>" not in vectors or "<Rescale>" not in vectors:
        raise ValueError(f"{path}: not a Kaldi CMVN file (expected <AddShift> and <Rescale> blocks)")
    return vectors["<AddShift>"], vectors["<Rescale>"]


def load_tokens(model_dir: Path) -> list[str]:
    """Token list: ``tokens.json`` (list) or ``tokens.txt`` (``token`` or ``token id`` a line)."""
    if (model_dir / "tokens.json").is_file():
        tokens = json.loads((model_dir / "tokens.json").read_text(encoding="utf-8"))
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{model_dir / 'tokens.json'}: expected a JSON list of strings")
        return tokens
    out: list[str] = []
    for line in (model_dir / "tokens.txt").read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if parts:
            out.append(parts[0])
    return out


def apply_lfr(feats: np.ndarray, lfr_m: int, lfr_n: int) -> np.ndarray:
    """Low frame rate: stack ``lfr_m`` frames every ``lfr_n`` (first frame repeated on the left,
    last frame on the right), as FunASR's frontend does."""
    if lfr_m == 1 and lfr_n == 1:
        return feats
    t = feats.shape[0]
    t_lfr = int(np.ceil(t / lfr_n))
    left = (lfr_m - 1) // 2
    padded = np.concatenate([np.repeat(feats[:1], left, axis=0), feats], axis=0)
    need = (t_lfr - 1) * lfr_n + lfr_m
    if need > padded.shape[0]:
        padded = np.concatenate([padded, np.repeat(padded[-1:], need - padded.shape[0], axis=0)], axis=0)
    idx = np.arange(t_lfr)[:, None] * lfr_n + np.arange(lfr_m)[None, :]
    return padded[idx].reshape(t_lfr, -1).astype(np.float32)


def char_times(peaks: np.ndarray, n_chars: int, alphas: np.ndarray | None = None) -> list[tuple[float, float]]:
    """(start_s, end_s) of each of ``n_chars`` characters from the upsampled CIF peaks.

    FunASR's standard rule: the second CIF fires when a character starts, so a character
    lasts from its peak to the next one, cut to 12 frames (the rest is silence); the last
    character ends midway to the end of the clip (or at it, within 5 frames). When the peaks
    do not number ``n_chars + 1``, the alphas are rescaled to sum to ``n_chars + 1`` and fired
    again, as FunASR does.
    """
    if n_chars == 0:
        return []
    peaks = np.asarray(peaks, np.float64).reshape(-1)
    fire = np.nonzero(peaks >= _PEAK)[0].astype(np.float64)
    if len(fire) != n_chars + 1 and alphas is not None and float(np.sum(alphas)) > 0:
        a = np.asarray(alphas, np.float64).reshape(-1)
        a = a * ((n_chars + 1) / a.sum())
        fire = _cif_fires(a)
    if len(fire) < n_chars + 1:  # still short: the missing characters get the clip's tail
        tail = np.full(n_chars + 1 - len(fire), float(max(len(peaks) - 1, fire[-1] if len(fire) else 0)))
        fire = np.concatenate([fire, tail])
    fire = fire[: n_chars + 1] + _SHIFT
    n_frames = len(peaks)
    spans: list[list[float]] = []  # characters and the silences cut off them, in order
    is_char: list[bool] = []
    for i in range(n_chars):
        start, nxt = fire[i], fire[i + 1]
        if nxt - start <= _MAX_TOKEN_FRAMES:
            spans.append([start, nxt])
            is_char.append(True)
        else:
            spans += [[start, start + _MAX_TOKEN_FRAMES], [start + _MAX_TOKEN_FRAMES, nxt]]
            is_char += [True, False]
    if n_frames - fire[-1] > 5:
        spans[-1][1] = (n_frames + fire[-1]) / 2
    else:
        spans[-1][1] = n_frames
    return [
        (round(float(max(s, 0.0)) * _TIME_RATE, 3), round(float(max(e, s, 0.0)) * _TIME_RATE, 3))
        for (s, e), c in zip(spans, is_char)
        if c
    ]


def _cif_fires(alphas: np.ndarray) -> np.ndarray:
    """Frames where a continuous integrate-and-fire over ``alphas`` crosses its threshold."""
    fires, acc = [], 0.0
    for t, a in enumerate(alphas):
        acc += a
        if acc >= _PEAK:
            fires.append(t)
            acc -= _PEAK
    return np.array(fires, np.float64)


class ParaformerBackend:
    """Batched Paraformer-zh ONNX inference with character timestamps and pause punctuation."""

    def __init__(self, model_dir: Path, *, device: str = "cpu", config: ParaformerSettings | None = None,
                 batch_size: int = 8) -> None:
        import kaldi_native_fbank as knf
        import onnxruntime as ort
        import yaml

        model_file = check_model_dir(model_dir)
        self.model_id = f"paraformer:{model_dir.name}/{model_file.name}"
        conf = yaml.safe_load((model_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        front = dict(conf.get("frontend_conf") or {})
        self.sample_rate = int(front.get("fs", ASR_SAMPLE_RATE))
        self.lfr_m, self.lfr_n = int(front.get("lfr_m", 1)), int(front.get("lfr_n", 1))
        opts = knf.FbankOptions()
        opts.frame_opts.samp_freq = self.sample_rate
        opts.frame_opts.dither = 0.0  # labels must not depend on a random draw
        opts.frame_opts.window_type = str(front.get("window", "hamming"))
        opts.frame_opts.frame_shift_ms = float(front.get("frame_shift", 10))
        opts.frame_opts.frame_length_ms = float(front.get("frame_length", 25))
        opts.frame_opts.snip_edges = True
        opts.mel_opts.num_bins = int(front.get("n_mels", 80))
        opts.energy_floor = 0.0
        self._fbank_opts = opts
        self._knf = knf
        self.shift, self.scale = load_cmvn(model_dir / "am.mvn")
        self.tokens = load_tokens(model_dir)
        self.pred_bias = int((conf.get("model_conf") or {}).get("predictor_bias", 0))
        self.batch_size = batch_size

        threads = None if config is None else int(config.cpu_threads or config.num_cpus)
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = onnx_session(model_file, threads, providers=providers, quiet=True)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        if len(self.output_names) < 4:
            raise ValueError(
                f"{model_file}: this Paraformer has no timestamp outputs (us_alphas, us_cif_peak; it has "
                f"{self.output_names}), so it cannot punctuate by pauses; stage a BiCif Paraformer-zh "
                f"(e.g. the paraformer-large-vad-punc -onnx release). Config key `{CONFIG_KEY}`."
            )

    def features(self, audio: np.ndarray) -> np.ndarray:
        """Fbank -> low frame rate -> CMVN, for one 16 kHz clip in [-1, 1]."""
        fb = self._knf.OnlineFbank(self._fbank_opts)
        fb.accept_waveform(self.sample_rate, (np.asarray(audio, np.float32) * 32768.0).tolist())
        fb.input_finished()
        n = fb.num_frames_ready
        dim = self._fbank_opts.mel_opts.num_bins
        if n == 0:
            return np.zeros((0, dim * self.lfr_m), np.float32)
        feats = np.stack([fb.get_frame(i) for i in range(n)]).astype(np.float32)
        feats = apply_lfr(feats, self.lfr_m, self.lfr_n)
        d = feats.shape[1]
        return ((feats + self.shift[:d]) * self.scale[:d]).astype(np.float32)

    def transcribe(
        self, audios: list[np.ndarray], sample_rate: int = ASR_SAMPLE_RATE, *, groups: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """One result per clip (``groups`` is accepted for the protocol; clips never share a window)."""
        out: list[dict[str, Any]] = []
        clips = [resample(np.asarray(a, np.float32), sample_rate, self.sample_rate) for a in audios]
        for b in range(0, len(clips), self.batch_size):
            out += self._batch(clips[b : b + self.batch_size])
        return out

    def _batch(self, clips: list[np.ndarray]) -> list[dict[str, Any]]:
        feats = [self.features(c) for c in clips]
        lens = np.array([len(f) for f in feats], np.int32)
        results: list[dict[str, Any]] = [_empty() for _ in clips]
        live = [i for i, n in enumerate(lens) if n > 0]
        if not live:
            return results
        t_max = int(lens[live].max())
        x = np.zeros((len(live), t_max, feats[live[0]].shape[1]), np.float32)
        for k, i in enumerate(live):
            x[k, : lens[i]] = feats[i]
        outs = self.session.run(self.output_names, dict(zip(self.input_names, [x, lens[live]])))
        logits, token_num, us_alphas, us_peaks = outs[:4]
        for k, i in enumerate(live):
            chars, logps = self._decode(logits[k], int(np.asarray(token_num[k]).reshape(-1)[0]))
            # only this clip's upsampled frames: 3 per low-frame-rate frame
            n_up = min(us_peaks.shape[-1], int(lens[i]) * (us_peaks.shape[-1] // max(t_max, 1)))
            times = char_times(us_peaks[k][:n_up], len(chars), us_alphas[k][:n_up])
            timed = [(c, s, e) for c, (s, e) in zip(chars, times)]
            text = punctuate_by_pauses(timed)
            results[i] = {
                "text": text,
                "language": "zh",
                "language_prob": None,
                "avg_logprob": float(np.mean(logps)) if logps else 0.0,
                "no_speech_prob": None,
                "compression_ratio": compression_ratio(text),
                "chars": timed,
            }
        return results

    def _decode(self, scores: np.ndarray, token_num: int) -> tuple[list[str], list[float]]:
        """Greedy tokens (blank/eos dropped, as FunASR does), cut to the predicted count."""
        scores = np.asarray(scores, np.float64)
        top = scores.max(-1, keepdims=True)
        logp = scores - top - np.log(np.sum(np.exp(scores - top), -1, keepdims=True))  # log-softmax
        ids = logp.argmax(-1)
        keep = [(int(t), float(logp[j, t])) for j, t in enumerate(ids) if int(t) not in (_BLANK, _EOS)]
        keep = keep[: max(0, token_num - self.pred_bias)]
        chars, logps = [], []
        for t, lp in keep:
            tok = self.tokens[t] if t < len(self.tokens) else "<unk>"
            if tok.startswith("<") and tok.endswith(">"):  # <unk>, <s>, </s>: no text, no time
                continue
            chars.append(tok.replace("@@", ""))
            logps.append(lp)
        return chars, logps


def _empty() -> dict[str, Any]:
    return {"text": "", "language": "zh", "language_prob": None, "avg_logprob": 0.0, "no_speech_prob": None,
            "compression_ratio": 0.0, "chars": []}


def resolve_paraformer(config: ParaformerSettings, context: StageContext) -> Path:
    """The staged model directory (checked without loading: cheap, for ``check()``)."""
    if not config.paraformer_model:
        raise ModelNotFoundError(f"no Paraformer-zh model configured (config key `{CONFIG_KEY}`). {HOW}")
    path = Path(config.paraformer_model).expanduser()
    if not path.is_absolute() and not path.exists():
        cand = context.cache_dir / "paraformer" / config.paraformer_model
        path = cand if cand.exists() else path
    check_model_dir(path)
    return path


def build_paraformer(config: ParaformerSettings, context: StageContext, device: str = "cpu") -> ParaformerBackend:
    """Load Paraformer-zh from ``transcribe.paraformer_model`` (once per worker)."""
    return ParaformerBackend(resolve_paraformer(config, context), device=device, config=config)
