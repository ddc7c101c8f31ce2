"""Per-segment quality signals: measured here, judged later by ``stages/filter.py``.

The quality stage only *measures*; thresholds live in the filter (the practice of the published speech-data pipelines: "record
every score and apply thresholds in a separate filter stage, so audits can re-threshold
without recompute"). Every signal is a plain number (or ``None`` when it cannot be measured,
e.g. SNR of digital silence), so it lands in the shard's ``json`` and the Parquet index.

Signals written on each ``status == "ok"`` segment row:

* ``snr_db``: WADA-SNR (Kim & Stern, Interspeech 2008), a blind estimate from the shape of
  the amplitude distribution; no model, so it runs everywhere. See :func:`wada_snr`.
* ``dnsmos_ovrl``, ``dnsmos_sig``, ``dnsmos_bak``: DNSMOS P.835 through the ``speechmos``
  package, whose wheel ships the ONNX files (works offline, 16 kHz).
* ``clipping_ratio``: fraction of samples sitting on a flat top at the segment's peak.
* ``silence_ratio``: fraction of 20 ms frames below an absolute level.
* ``words_per_s``, ``chars_per_s``: speaking rate from the transcript (when there is one).
* hallucination signals: ``repeat_ngram_ratio`` (repeated word n-grams),
  ``text_compression_ratio`` (zlib ratio of the text, Whisper's own formula),
  ``no_speech_with_text`` (Whisper thinks there is no speech yet emitted text). Text length
  versus duration is ``chars_per_s``.
* ``audio_fp``: an exact-duplicate fingerprint of the 16-bit PCM samples.

Example:
    >>> import numpy as np
    >>> stage = QualityStage(QualityConfig(dnsmos=False))
    >>> rng = np.random.default_rng(0)
    >>> row = {"recording_id": "r", "status": "ok", "sample_rate": 16000, "duration_s": 1.0,
    ...        "audio": (0.1 * rng.standard_normal(16000)).astype(np.float32), "text": "hello there"}
    >>> out = stage([row])[0]
    >>> out["words_per_s"], out["silence_ratio"]
    (2.0, 0.0)
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import unicodedata
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from kimia_model.audio import resample
from kimia_model.ort_session import onnx_session
from kimia_model.refs import missing, resolve_packaged
from stages.base import Row, Stage, StageConfig, StageError, runtime_label
from stages.rows import finite_or_none
from stages.textnorm import spoken_chars

DNSMOS_SAMPLE_RATE = 16000

#: Signals computed from the transcript.
TEXT_FIELDS = ("words_per_s", "chars_per_s", "repeat_ngram_ratio", "text_compression_ratio", "no_speech_with_text")

#: Fields this stage writes (the audit and the filter read them by these names).
QUALITY_FIELDS = (
    "quality_stream",
    "snr_db",
    "dnsmos_ovrl",
    "dnsmos_sig",
    "dnsmos_bak",
    "clipping_ratio",
    "silence_ratio",
    "words_per_s",
    "chars_per_s",
    "repeat_ngram_ratio",
    "text_compression_ratio",
    "no_speech_with_text",
    "audio_fp",
)


class QualityConfig(StageConfig):
    """The ``quality`` section: how each signal is measured (not whether it passes)."""

    model: str = Field(
        "pkg:dnsmos",
        description="DNSMOS P.835 model reference; pkg:dnsmos = the ONNX files the speechmos wheel ships.",
    )
    dnsmos: bool = Field(True, description="Compute DNSMOS (about 0.45 s of one core per 9 s window on a "
                         "2-core AMD EPYC: its convolutions run at the core's arithmetic peak).")
    dnsmos_personalized: bool = Field(
        False,
        description="Use the personalized DNSMOS model, which also penalises interfering talkers.",
    )
    dnsmos_max_s: float = Field(
        30.0,
        gt=9.0,
        le=3600.0,
        description="Score at most this many seconds (centre crop): DNSMOS hops 1 s over 9 s windows, so "
        "cost grows with length while the mean score barely moves after a few windows.",
    )
    dnsmos_hop_s: float = Field(
        9.01,
        ge=1.0,
        le=9.01,
        description="Hop between DNSMOS' 9.01 s windows. 1.0 = Microsoft's reference (19 windows for "
        "27 s); 9.01 = non-overlapping, same mean score at 1/9 of the cost.",
    )
    dnsmos_short: str = Field(
        "tile",
        pattern=r"^(native|tile)$",
        description="A segment shorter than DNSMOS' 9.01 s window: tile = repeated to 9.01 s as Microsoft's "
        "reference does (a 3 s segment costs a 9 s pass); native = scored at its own length (the model ends "
        "in a global max pool), about half the cost on 5 s turns but not the reference's number: on "
        "espeak-ng turns OVRL came out 0.10 lower on average (0.14 mean absolute difference), so thresholds "
        "from the literature no longer apply as they are.",
    )
    onnx_threads: int = Field(1, ge=1, le=64, description="ONNX Runtime intra-op threads per worker.")
    audio_field: str | None = Field(
        None,
        pattern=r"^(audio|audio_enhanced)$",
        description="Which waveform to measure: audio (audio.flac) or audio_enhanced (enhanced.flac, "
        "the original where enhancement did not run). null = as filter.stream says, so the filter "
        "judges the stream that goes into the shard.",
    )
    silence_threshold_dbfs: float = Field(
        -50.0,
        ge=-120.0,
        le=0.0,
        description="A 20 ms frame whose RMS is below this level counts as silence. Rows arrive "
        "loudness-normalised (decode), so speech frames sit near -20 dBFS; -50 dBFS is 30 dB below.",
    )
    silence_frame_ms: float = Field(20.0, gt=1.0, le=500.0, description="Frame length for silence_ratio.")
    clip_rel_level: float = Field(
        0.99,
        gt=0.5,
        lt=1.0,
        description="A sample counts towards clipping when it is within (1 - this) of the segment's "
        "peak and its neighbour is too (a flat top). Relative, because decode rescales clipped "
        "audio so its flat tops no longer sit at full scale.",
    )
    ngram_n: int = Field(3, ge=1, le=8, description="n of the word n-grams used for repeat_ngram_ratio.")
    no_speech_threshold: float = Field(
        0.6,
        ge=0.0,
        le=1.0,
        description="no_speech_prob above which a non-empty transcript is flagged no_speech_with_text "
        "(openai-whisper transcribe()'s no_speech_threshold default).",
    )


# -- WADA-SNR --------------------------------------------------------------------------------

#: Shape parameter of the Gamma amplitude model of clean speech used by WADA (Kim & Stern 2008).
WADA_ALPHA = 0.4
_WADA_SNR_GRID = np.arange(-20.0, 100.5, 0.5)


@functools.lru_cache(maxsize=4)
def _wada_table(alpha: float = WADA_ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """G(SNR) = log E|x| - E log|x| for Gamma-amplitude speech plus Gaussian noise.

    WADA's estimator needs this curve; the original ships it as a precomputed table. We
    rebuild it by Monte Carlo with a fixed seed (common random numbers for every SNR, so the
    curve is smooth and monotone), which takes ~0.3 s once per process.
    """
    rng = np.random.default_rng(20080922)
    n = 400_000
    # Speech amplitude ~ Gamma(alpha) with a random sign; unit power after scaling.
    s = rng.gamma(alpha, 1.0, n) * rng.choice((-1.0, 1.0), n)
    s /= np.sqrt(np.mean(s**2))
    noise = rng.standard_normal(n)
    g = np.empty_like(_WADA_SNR_GRID)
    for i, snr in enumerate(_WADA_SNR_GRID):
        x = np.abs(s * 10.0 ** (snr / 20.0) + noise)
        x = np.maximum(x / x.max(), 1e-10)
        g[i] = np.log(x.mean()) - np.log(x).mean()
    # G rises with SNR; enforce strict monotonicity so np.interp is well defined.
    g = np.maximum.accumulate(g + np.arange(g.size) * 1e-12)
    return g, _WADA_SNR_GRID.copy()


def wada_snr(audio: np.ndarray) -> float | None:
    """Blind SNR estimate (dB) of speech in stationary Gaussian-like noise.

    Speech amplitudes follow a peaky Gamma distribution, Gaussian noise a flat one; the gap
    between the log of the mean amplitude and the mean log amplitude (G) grows with the
    speech share, so inverting G(SNR) gives the SNR. The estimate is clamped to the table's
    range, [-20, 100] dB. Returns ``None`` for digital silence, where SNR is undefined.

    >>> rng = np.random.default_rng(1)
    >>> wada_snr(rng.standard_normal(16000)) < -10  # pure noise
    True
    """
    x = np.abs(np.asarray(audio, dtype=np.float64))
    peak = x.max() if x.size else 0.0
    if peak <= 0.0 or not np.isfinite(peak):
        return None
    x = np.maximum(x / peak, 1e-10)
    g_obs = np.log(x.mean()) - np.log(x).mean()
    g_tab, snr_tab = _wada_table()
    return float(np.interp(g_obs, g_tab, snr_tab))


# -- signal measures -----------------------------------------------------------------------


def clipping_ratio(audio: np.ndarray, rel_level: float = 0.99) -> float:
    """Fraction of samples on flat tops at the segment's peak.

    Clipping leaves runs of consecutive samples at the same extreme; natural speech touches
    its peak in isolated samples. Requiring a neighbour at the same level separates the two
    even after decode's gain change moved the flat tops below full scale.

    A pure low tone is not a good test signal: its crests are naturally flat to 1 %. Speech
    and noise are peaky:

    >>> x = np.random.default_rng(0).standard_normal(16000) / 4
    >>> clipping_ratio(x) < 0.001, clipping_ratio(0.5 * np.clip(4 * x, -1, 1)) > 0.1
    (True, True)
    """
    x = np.abs(np.asarray(audio, dtype=np.float32))
    if x.size < 2:
        return 0.0
    peak = float(x.max())
    if peak <= 0.0:
        return 0.0
    high = x >= rel_level * peak
    flat = high[1:] & high[:-1]
    on_run = np.zeros_like(high)
    on_run[1:] |= flat
    on_run[:-1] |= flat
    return float(on_run.mean())


def silence_ratio(audio: np.ndarray, sample_rate: int, threshold_dbfs: float = -50.0, frame_ms: float = 20.0) -> float:
    """Fraction of non-overlapping frames whose RMS is below ``threshold_dbfs``.

    >>> silence_ratio(np.zeros(1600, np.float32), 16000)
    1.0
    """
    x = np.asarray(audio, dtype=np.float64)
    frame = max(1, int(round(sample_rate * frame_ms / 1000.0)))
    n = x.size // frame
    if n == 0:
        return 1.0 if x.size == 0 or np.sqrt(np.mean(x**2)) < 10 ** (threshold_dbfs / 20) else 0.0
    rms = np.sqrt(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1))
    return float(np.mean(rms < 10.0 ** (threshold_dbfs / 20.0)))


def pcm16(audio: np.ndarray) -> np.ndarray:
    """The 16-bit samples audio.flac stores for ``audio``: libsndfile's float-to-PCM_16 rule,
    ``clip(round(x * 32768), -32768, 32767)`` (verified bit-exact against soundfile)."""
    x = np.clip(np.asarray(audio, dtype=np.float64), -1.0, 1.0) * 32768.0
    return np.clip(np.round(x), -32768, 32767).astype("<i2")


def audio_fingerprint(audio: np.ndarray, sample_rate: int) -> str:
    """Exact-duplicate fingerprint: blake2b of the 16-bit PCM samples and the rate.

    Hashing exactly the samples audio.flac will hold (see :func:`pcm16`) means two samples
    whose shard audio is identical share a fingerprint, and the audit can recompute it from
    the decoded FLAC to prove the audio was not altered after the run.

    >>> a = np.linspace(-0.5, 0.5, 100, dtype=np.float32)
    >>> audio_fingerprint(a, 16000) == audio_fingerprint(a.copy(), 16000)
    True
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(str(int(sample_rate)).encode() + b":")
    h.update(pcm16(audio).tobytes())
    return h.hexdigest()


# -- text measures ---------------------------------------------------------------------------

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")


def _is_cjk_dominant(text: str) -> bool:
    letters = [c for c in text if c.isalnum()]
    return bool(letters) and sum(bool(_CJK.match(c)) for c in letters) > len(letters) / 2


def text_units(text: str) -> list[str]:
    """Lower-case word tokens; each CJK character is its own token (no spaces to split on).

    >>> text_units("Hello, world! 你好")
    ['hello', 'world', '你', '好']
    """
    norm = unicodedata.normalize("NFKC", text).lower()
    norm = _CJK.sub(lambda m: f" {m.group(0)} ", norm)
    # Drop punctuation but keep apostrophes inside words ("don't" is one word).
    norm = "".join(c if (c.isalnum() or c in " '") else " " for c in norm)
    return [w.strip("'") for w in norm.split() if w.strip("'")]


def repeat_ngram_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one: 0 for normal prose, near 1 for loops.

    Whisper's typical hallucination is a phrase looping ("thank you thank you ..."). Texts
    too short to hold a repeat (fewer than ``n + 1`` tokens) score 0.

    >>> repeat_ngram_ratio("thank you thank you thank you thank you")
    0.6666666666666667
    >>> repeat_ngram_ratio("the quick brown fox jumps over the lazy dog")
    0.0
    """
    units = text_units(text)
    n = max(1, min(n, len(units) - 1)) if len(units) > 1 else n
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def text_compression_ratio(text: str) -> float | None:
    """len(utf-8 bytes) / len(zlib-compressed bytes): openai-whisper's repetition measure."""
    data = text.encode("utf-8")
    if not data:
        return None
    return len(data) / len(zlib.compress(data))


# -- DNSMOS ----------------------------------------------------------------------------------


#: The frame hop of DNSMOS' built-in STFT (samples at 16 kHz); its frames are 320 samples long.
DNSMOS_HOP = 160


def _any_length_model(path: Path) -> bytes | None:
    """DNSMOS P.835 rewritten to accept any length, or None when the graph is not the one we know.

    Past its STFT (a strided slice-and-reshape into 320-sample frames of hop 160) the model is
    convolutions, max pools and a *global* max pool before its dense head, so the only things
    tying it to 9.01 s are the declared input size, the slice end (144000) and the reshape to
    900 frames. Rewriting those three to "all frames" lets a short segment be scored on its own
    frames instead of being tiled to 9.01 s: the same kind of evidence (the max over the
    segment's own time-frequency patches; tiling repeats them and adds seams) at a fraction of
    the cost, though not the same number (see ``QualityConfig.dnsmos_short``). Longer segments
    still go through the reference's 9.01 s windows.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    need = ("input_1:01_cropping_end", "shape_tensor", "shape_tensor1")
    if len(model.graph.input) != 1 or any(n not in inits for n in need):
        return None
    end = numpy_helper.to_array(inits["input_1:01_cropping_end"])
    shapes = [numpy_helper.to_array(inits[n]) for n in need[1:]]
    if list(end[1:]) != [144000] or any(list(s) != [-1, 900, DNSMOS_HOP] for s in shapes):
        return None
    end = end.copy()
    end[1] = -DNSMOS_HOP
    inits["input_1:01_cropping_end"].CopyFrom(numpy_helper.from_array(end, "input_1:01_cropping_end"))
    for n in need[1:]:  # [batch as given, all frames, 160]
        inits[n].CopyFrom(numpy_helper.from_array(np.array([0, -1, DNSMOS_HOP], np.int64), n))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[1].ClearField("dim_value")
    dims[1].dim_param = "samples"
    return model.SerializeToString()


class _Dnsmos:
    """DNSMOS P.835 from speechmos' ONNX files, with thread-limited sessions and a wider hop.

    speechmos builds its sessions with ONNX Runtime defaults (one thread per core), which
    oversubscribes a shared worker, and, like Microsoft's reference script, scores 9.01 s
    windows every 1 s: a 27 s segment costs 19 windows. The score is the mean over windows,
    so non-overlapping windows (``hop_s = 9.01``) give the same expectation at 1/9 of the
    cost; ``hop_s = 1.0`` reproduces the reference exactly (tests/test_quality.py checks it
    against speechmos' own scorer). The calibration polynomials are speechmos'.

    The reference tiles a clip shorter than 9.01 s until it fills a window, so a 3 s segment
    costs a 9 s pass. With ``short="native"`` it is scored at its own length through
    :func:`_any_length_model` instead (3x less work for that segment); ``short="tile"`` keeps
    the reference's tiling.
    """

    def __init__(
        self, model_dir: Path, personalized: bool, threads: int, hop_s: float = 9.01, short: str = "tile"
    ) -> None:
        from speechmos.dnsmos import DNSMOS

        primary = dnsmos_files(model_dir, personalized)[0]
        self._session = onnx_session(primary, threads)
        self._native = None
        if short == "native":
            graph = _any_length_model(primary)
            if graph is None:
                logging.getLogger(__name__).warning(
                    "quality.dnsmos_short=native needs the onnx package and speechmos' DNSMOS graph (%s); "
                    "short segments are tiled as in the reference", primary
                )
            else:
                self._native = onnx_session(graph, threads)
        self._calibrate = functools.partial(DNSMOS.get_polyfit_val, None, is_personalized_MOS=personalized)
        self._hop = max(1, int(round(hop_s * DNSMOS_SAMPLE_RATE)))

    def __call__(self, audio16k: np.ndarray) -> dict[str, float]:
        from speechmos.dnsmos import INPUT_LENGTH

        audio = np.clip(np.asarray(audio16k, dtype=np.float32), -1.0, 1.0)
        win = int(INPUT_LENGTH * DNSMOS_SAMPLE_RATE)
        if audio.size < win and self._native is not None and audio.size >= 4 * DNSMOS_HOP:
            usable = (audio.size // DNSMOS_HOP) * DNSMOS_HOP  # whole frames: drops under 10 ms
            raw = self._native.run(None, {"input_1": audio[np.newaxis, :usable]})[0][0]
            sig, bak, ovrl = self._calibrate(*raw)
            return {"ovrl": float(ovrl), "sig": float(sig), "bak": float(bak)}
        if audio.size < win:  # the model needs 9.01 s: repeat short clips, as the reference does
            audio = np.tile(audio, int(np.ceil(win / max(1, audio.size))))
        # The reference scores floor(duration) - 9.01 + 1 windows (whole seconds only).
        last = int(np.floor(audio.size / DNSMOS_SAMPLE_RATE - INPUT_LENGTH)) * DNSMOS_SAMPLE_RATE
        scores = []
        for start in range(0, max(0, last) + 1, self._hop):
            seg = audio[start : start + win]
            if seg.size < win:
                break
            raw = self._session.run(None, {"input_1": seg[np.newaxis, :]})[0][0]
            scores.append(self._calibrate(*raw))
        sig, bak, ovrl = (float(np.mean([s[i] for s in scores])) for i in range(3))
        return {"ovrl": ovrl, "sig": sig, "bak": bak}


def dnsmos_files(model_dir: Path, personalized: bool) -> list[Path]:
    """The ONNX files DNSMOS needs under the speechmos package directory."""
    sub = "pdnsmos_models" if personalized else "dnsmos_models"
    return [model_dir / sub / "sig_bak_ovr.onnx", model_dir / "dnsmos_models" / "model_v8.onnx"]


# -- the stage -------------------------------------------------------------------------------


_num = finite_or_none


class QualityStage(Stage):
    """Measure every quality signal of a segment row (see the module docstring)."""

    name: ClassVar[str] = "quality"
    reads: ClassVar[tuple[str, ...]] = (
        "audio",
        "audio_enhanced",
        "sample_rate",
        "duration_s",
        "text",
        "no_speech_prob",
    )
    writes: ClassVar[tuple[str, ...]] = QUALITY_FIELDS
    uses_model: ClassVar[bool] = True
    cpu_share: ClassVar[float] = 0.2

    config: QualityConfig

    def __init__(self, config: QualityConfig, context: Any = None) -> None:
        super().__init__(config, context)
        self._dnsmos: _Dnsmos | None = None

    def worker_threads(self, node_cpus: int) -> int:
        return self.config.onnx_threads

    def _model_dir(self) -> Path:
        if self.config.model.startswith("pkg:"):
            return resolve_packaged(self.config.model[4:], "quality.model", self.context.cache_dir)
        return Path(self.config.model).expanduser()

    def check(self) -> None:
        """Fail before any work when DNSMOS is on but its ONNX files are absent."""
        if not (self.config.enabled and self.config.dnsmos):
            return
        model_dir = self._model_dir()
        for f in dnsmos_files(model_dir, self.config.dnsmos_personalized):
            if not f.exists():
                raise missing(
                    f,
                    "quality.model",
                    "Install the speechmos wheel (pip install speechmos==0.0.1.1), point quality.model "
                    "at a directory holding dnsmos_models/{sig_bak_ovr,model_v8}.onnx, or set quality.dnsmos=false.",
                )

    def setup(self) -> None:
        if self.config.dnsmos:
            self.check()
            self._dnsmos = _Dnsmos(
                self._model_dir(),
                self.config.dnsmos_personalized,
                self.config.onnx_threads,
                self.config.dnsmos_hop_s,
                self.config.dnsmos_short,
            )

    def model_id(self) -> str:
        return self.config.model if self.config.dnsmos else "none"

    def runtime(self) -> str | None:
        # DNSMOS's ONNX CNNs on onnxruntime's CPU provider, whatever device the run has.
        return runtime_label("cpu", "float32", "none") if self.config.dnsmos else None

    def process_batch(self, rows: list[Row]) -> list[Row]:
        return [self._measure(r) for r in rows]

    def _measure(self, row: Row) -> Row:
        cfg = self.config
        field = cfg.audio_field or "audio_enhanced"
        audio = row.get(field)
        stream = "enhanced" if field == "audio_enhanced" else "original"
        if audio is None and field == "audio_enhanced":
            audio, stream = row.get("audio"), "original"  # enhance disabled: measure what will be written
        if audio is None:
            raise StageError(f"quality: row has no `{field}` waveform")
        sr = row.get("sample_rate")
        if not isinstance(sr, (int, np.integer)) or sr <= 0:
            raise StageError(f"quality: invalid sample_rate {sr!r}")
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise StageError(f"quality: expected mono audio, got shape {audio.shape}")
        if audio.size == 0:
            raise StageError("quality: empty audio")
        if not np.all(np.isfinite(audio)):
            raise StageError("quality: audio contains NaN or Inf samples")
        duration = _num(row.get("duration_s")) or audio.size / sr

        out = dict(row)
        out["quality_stream"] = stream
        out["snr_db"] = wada_snr(audio)
        out["clipping_ratio"] = clipping_ratio(audio, cfg.clip_rel_level)
        out["silence_ratio"] = silence_ratio(audio, int(sr), cfg.silence_threshold_dbfs, cfg.silence_frame_ms)
        out["audio_fp"] = audio_fingerprint(audio, int(sr))

        out["dnsmos_ovrl"] = out["dnsmos_sig"] = out["dnsmos_bak"] = None
        if self._dnsmos is not None and float(np.max(np.abs(audio))) > 0.0:
            a16 = resample(audio, int(sr), DNSMOS_SAMPLE_RATE)
            cap = int(cfg.dnsmos_max_s * DNSMOS_SAMPLE_RATE)
            if a16.size > cap:
                start = (a16.size - cap) // 2
                a16 = a16[start : start + cap]
            scores = self._dnsmos(a16)
            out["dnsmos_ovrl"], out["dnsmos_sig"], out["dnsmos_bak"] = scores["ovrl"], scores["sig"], scores["bak"]

        out.update(text_signals(row, cfg, duration))
        return out


def text_signals(row: Row, cfg: QualityConfig, duration: float) -> dict[str, Any]:
    """The transcript's signals (:data:`TEXT_FIELDS`); all None without a transcript (not checked).

    >>> s = text_signals({"text": "thank you thank you thank you", "no_speech_prob": 0.9}, QualityConfig(), 2.0)
    >>> s["words_per_s"], s["no_speech_with_text"], text_signals({}, QualityConfig(), 2.0)["chars_per_s"]
    (3.0, True, None)
    """
    text = row.get("text")
    if not isinstance(text, str):
        return dict.fromkeys(TEXT_FIELDS)
    units = text_units(text)
    nsp = _num(row.get("no_speech_prob"))
    return {
        # Whitespace words mean nothing in Mandarin or Japanese text: leave words_per_s unset
        # there (not checked) and let chars_per_s carry the speaking rate.
        "words_per_s": None if _is_cjk_dominant(text) else len(units) / duration,
        "chars_per_s": spoken_chars(text) / duration,
        "repeat_ngram_ratio": repeat_ngram_ratio(text, cfg.ngram_n),
        "text_compression_ratio": text_compression_ratio(text.strip()),
        "no_speech_with_text": None if nsp is None else bool(nsp > cfg.no_speech_threshold and bool(units)),
    }


class TranscriptQualityStage(Stage):
    """The transcript's signals alone, for a run whose quality stage measured the audio before
    transcription (``transcribe.kept_only``): the same ``quality`` settings, no model, so it
    runs as a task.

    >>> row = {"recording_id": "r", "status": "ok", "duration_s": 2.0, "text": "hello there"}
    >>> TranscriptQualityStage(QualityConfig())([row])[0]["words_per_s"]
    1.0
    """

    name: ClassVar[str] = "quality_text"
    section: ClassVar[str | None] = "quality"
    reads: ClassVar[tuple[str, ...]] = ("duration_s", "text", "no_speech_prob")
    writes: ClassVar[tuple[str, ...]] = TEXT_FIELDS
    uses_model: ClassVar[bool] = False

    config: QualityConfig

    def takes(self, row: Row) -> bool:
        """Rows with a transcript: a segment the audio checks dropped has none to measure."""
        return isinstance(row.get("text"), str)

    def process_batch(self, rows: list[Row]) -> list[Row]:
        out = []
        for r in rows:
            duration = _num(r.get("duration_s"))
            if not duration or duration <= 0:
                raise StageError(f"quality_text: invalid duration_s {r.get('duration_s')!r}")
            out.append({**r, **text_signals(r, self.config, duration)})
        return out
