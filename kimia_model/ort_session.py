"""ONNX Runtime sessions with an explicit thread budget.

ONNX Runtime's default gives every session one intra-op thread per core. A pipeline worker
shares its node with other stages' workers, so each ONNX model here (Silero VAD, DNSMOS, the
d-vector embedder, Paraformer) runs with the threads its stage was given instead. Sessions run
in ONNX Runtime's default sequential mode, one operator at a time (DNSMOS' two STFT branches
too), so the inter-op pool is held at one thread: more would only sit idle.

    >>> from kimia_model.ort_session import onnx_session
    >>> session = onnx_session(model_path, threads=1)          # doctest: +SKIP
    >>> session.run(None, {"input": features})                # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def onnx_session(
    model: str | Path | bytes, threads: int | None, *, providers: list[str] | None = None, quiet: bool = False
) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``threads`` intra-op threads (None: ORT's default).

    ``model`` is a file or a serialized graph (a graph rewritten in memory, as DNSMOS' any-length
    form is). ``providers`` defaults to the CPU provider alone; pass a list that puts
    ``CUDAExecutionProvider`` first to use a GPU where ONNX Runtime has one. ``quiet`` keeps
    ONNX Runtime's own warnings (graph notices a user cannot act on) out of the run's log.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    if quiet:
        options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=providers or ["CPUExecutionProvider"])
