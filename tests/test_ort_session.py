"""ONNX sessions keep to the thread budget their stage was given, from a file or from bytes."""

from __future__ import annotations

import numpy as np
import pytest

from kimia_model.ort_session import onnx_session

onnx = pytest.importorskip("onnx")


def _doubler() -> bytes:
    """A one-node graph, y = x + x, over a float vector of any length."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "doubler", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_session_from_file_keeps_its_thread_budget(tmp_path, threads):
    path = tmp_path / "doubler.onnx"
    path.write_bytes(_doubler())
    session = onnx_session(path, threads)
    options = session.get_session_options()
    assert options.intra_op_num_threads == threads
    assert options.inter_op_num_threads == 1
    assert session.get_providers() == ["CPUExecutionProvider"]
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], 2 * x)


def test_session_from_bytes_and_default_threads():
    session = onnx_session(_doubler(), None, quiet=True)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 0  # ONNX Runtime's own choice: one per core
    assert options.log_severity_level == 3
    np.testing.assert_array_equal(session.run(None, {"x": np.ones(3, np.float32)})[0], np.full(3, 2.0))
