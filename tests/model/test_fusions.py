"""The decoder's RMSNorm fusion on small graphs written in Gemma4RMSNorm's own spelling."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gemma_mesh.model.export.fusions import fuse_decoder

WIDTH = 16
EPS = 1e-6


def _norm(prefix: str, x: str, scale: str | None, scale_first: bool = False) -> list:
    """x * pow(mean(x^2) + eps, -0.5) [* scale], as torch.onnx exports Gemma4RMSNorm."""
    nodes = [
        helper.make_node("Pow", [x, "two"], [f"{prefix}_sq"]),
        helper.make_node(
            "ReduceMean", [f"{prefix}_sq", "axes"], [f"{prefix}_ms"], keepdims=1, noop_with_empty_axes=0
        ),
        helper.make_node("Add", [f"{prefix}_ms", "eps"], [f"{prefix}_mse"]),
        helper.make_node("Pow", [f"{prefix}_mse", "minus_half"], [f"{prefix}_rrms"]),
        helper.make_node("Mul", [x, f"{prefix}_rrms"], [f"{prefix}_normed"]),
    ]
    if scale is not None:
        operands = [scale, f"{prefix}_normed"] if scale_first else [f"{prefix}_normed", scale]
        nodes.append(helper.make_node("Mul", operands, [f"{prefix}_out"]))
    return nodes


def _graph(path: Path, *, external: bool = False, norms: bool = True) -> None:
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.uniform(0.5, 1.5, WIDTH).astype(np.float32),
        "w2": rng.uniform(0.5, 1.5, WIDTH).astype(np.float32),
        "proj": rng.standard_normal((WIDTH, WIDTH)).astype(np.float32),
    }
    # The exponents and epsilon go to the external data file with the weights (the fusion must read
    # them back); the reduction axes stay a Constant node (ONNX Runtime reads shape inputs inline).
    consts = {
        "two": np.array(2.0, np.float32),
        "minus_half": np.array(-0.5, np.float32),
        "eps": np.array(EPS, np.float32),
    }
    axes = helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([-1], np.int64)))
    if norms:
        nodes = [*_norm("a", "x", "w1"), helper.make_node("MatMul", ["a_out", "proj"], ["h"])]
        nodes += _norm("b", "h", "w2", scale_first=True) + _norm("c", "b_out", None)
        out = "c_normed"
    else:
        nodes, out = [helper.make_node("MatMul", ["x", "proj"], ["y"])], "y"
    graph = helper.make_graph(
        [axes, *nodes],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", WIDTH])],
        [numpy_helper.from_array(v, k) for k, v in {**weights, **consts}.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = onnx.shape_inference.infer_shapes(model)
    if external:
        onnx.save_model(
            model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0
        )
    else:
        onnx.save(model, str(path))


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("external", [False, True])
def test_gemma_rms_norms_become_one_kernel_each_with_the_same_output(tmp_path, external):
    path = tmp_path / "decoder.onnx"
    _graph(path, external=external)
    x = np.random.default_rng(1).standard_normal((5, WIDTH)).astype(np.float32)
    before = _run(path, x)
    data = tmp_path / "decoder.onnx.data"
    digest = hashlib.sha256(data.read_bytes()).hexdigest() if external else None

    assert fuse_decoder(path) == {"rms_norm": 3}

    ops = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    assert ops["SimplifiedLayerNormalization"] == 3 and ops["Pow"] == 0 and ops["ReduceMean"] == 0
    assert ops["MatMul"] == 1
    np.testing.assert_allclose(_run(path, x), before, rtol=1e-5, atol=1e-6)
    if external:  # the weights were never rewritten: the graph still points at the same bytes
        assert hashlib.sha256(data.read_bytes()).hexdigest() == digest


def test_fusing_is_deterministic(tmp_path):
    outputs = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.onnx"
        _graph(path)
        fuse_decoder(path)
        outputs.append(path.read_bytes())
    assert outputs[0] == outputs[1]
    assert all(not n.metadata_props for n in onnx.load(str(tmp_path / "a.onnx")).graph.node)


def test_a_graph_without_gemma_norms_is_refused(tmp_path):
    path = tmp_path / "other.onnx"
    _graph(path, norms=False)
    with pytest.raises(ValueError, match="no Gemma RMSNorm"):
        fuse_decoder(path)
