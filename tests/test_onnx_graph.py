"""The ONNX rewrite of tf2onnx's PReLU pattern (``models.onnx_graph``) on a small graph
built here: the same answers as a per-channel PReLU, no Neg left, and a pattern whose
inner result is used elsewhere left alone."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def prelu_graph(slope: np.ndarray, share_inner: bool = False):
    """x -> Conv 1x1 -> tf2onnx's PReLU (Relu, Neg, Relu, Mul by -slope, Add) -> y."""
    from onnx import TensorProto, helper, numpy_helper

    c = slope.size
    weight = np.random.default_rng(1).normal(size=(c, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["h"], ["pos"]),
             helper.make_node("Neg", ["h"], ["neg"]),
             helper.make_node("Relu", ["neg"], ["rneg"]),
             helper.make_node("Mul", ["rneg", "alpha"], ["scaled"]),
             helper.make_node("Add", ["pos", "scaled"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, c, 5, 5])]
    if share_inner:  # the inner ReLU is an output too: not a bare PReLU
        outputs.append(helper.make_tensor_value_info("rneg", TensorProto.FLOAT,
                                                      [None, c, 5, 5]))
    graph = helper.make_graph(
        nodes, "prelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                       [None, 3, 5, 5])], outputs,
        [numpy_helper.from_array(weight, "w"),
         numpy_helper.from_array(-slope.reshape(1, c, 1, 1).astype(np.float32), "alpha")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), weight


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def test_prelu_pattern_becomes_convolutions_with_the_same_answers():
    from models.onnx_graph import prelu_as_convs

    slope = np.array([0.1, 0.25, -0.3, 1.5], np.float32)
    model, weight = prelu_graph(slope)
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 5)).astype(np.float32)
    before = run(model, x)
    assert prelu_as_convs(model) == 1
    onnx.checker.check_model(model)
    assert "Neg" not in {n.op_type for n in model.graph.node}
    h = np.einsum("oc,nchw->nohw", weight[:, :, 0, 0], x)
    want = np.where(h > 0, h, slope.reshape(1, -1, 1, 1) * h)
    np.testing.assert_allclose(before, want, atol=1e-5)  # the pattern is a PReLU
    np.testing.assert_allclose(run(model, x), want, atol=1e-5)


def test_a_pattern_whose_inner_result_is_used_elsewhere_is_left_alone():
    from models.onnx_graph import prelu_as_convs

    model, _ = prelu_graph(np.array([0.2, 0.3], np.float32), share_inner=True)
    assert prelu_as_convs(model) == 0
    assert "Neg" in {n.op_type for n in model.graph.node}
