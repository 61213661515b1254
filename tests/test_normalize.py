"""normalize: every linear layer becomes MatMul(X, initializer W[K, N]) and the model computes the same."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxq.errors import OnnxqError
from onnxq.graph.io import load_model, save_model_atomic
from onnxq.graph.normalize import normalize
from tests.helpers import check_same_outputs
from tests.tiny import (
    constant_weight_model, gemm_model, matmul_model, tied_embedding_model, tiny_bert_onnx, tiny_gpt2_onnx,
    tiny_llama_onnx, transpose_weight_model,
)


def linear_weights(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """MatMul node name -> shape of its initializer weight, for MatMuls fed by an initializer."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}


def exported(kind, tmp_path):
    build = {"llama": tiny_llama_onnx, "gpt2": tiny_gpt2_onnx, "bert": tiny_bert_onnx}
    if kind == "gpt2-unfolded":
        return onnx.load(tiny_gpt2_onnx(tmp_path, constant_folding=False))
    return onnx.load(build[kind](tmp_path))


@pytest.mark.parametrize(
    "kind,n_linear",
    [("llama", 15), ("gpt2", 9), ("gpt2-unfolded", 9), ("bert", 12)],  # 7 or 4 per layer (+ lm_head) x 2 layers
)
def test_exported_models(kind, n_linear, tmp_path):
    before = exported(kind, tmp_path)
    after = normalize(exported(kind, tmp_path))
    onnx.checker.check_model(after, full_check=True)
    weights = linear_weights(after)
    assert len(weights) == n_linear and all(len(s) == 2 for s in weights.values())
    assert not any(n.op_type == "Gemm" for n in after.graph.node)
    assert {n.name for n in before.graph.node if n.op_type == "MatMul"} <= {n.name for n in after.graph.node}
    inferred = {v.name for v in after.graph.value_info}
    assert all(n.output[0] in inferred for n in after.graph.node if n.op_type == "MatMul" and n.output[0] not in
               {o.name for o in after.graph.output})
    check_same_outputs(before, after)


def test_gpt2_gemm_names_and_weights(tmp_path):
    model = normalize(onnx.load(tiny_gpt2_onnx(tmp_path)))
    weights = linear_weights(model)
    assert weights["/transformer/h.0/attn/c_attn/MatMul"] == (64, 192)  # fused QKV, Conv1D weight [in, out] as is
    assert weights["/transformer/h.0/mlp/c_proj/MatMul"] == (256, 64)
    add = next(n for n in model.graph.node if n.name == "/transformer/h.0/attn/c_attn/Add")
    assert add.input[0] == "/transformer/h.0/attn/c_attn/MatMul_output_0"


@pytest.mark.parametrize(
    "kwargs",
    [dict(trans_b=0), dict(trans_b=1), dict(trans_b=1, bias=False), dict(trans_b=0, alpha=0.5, beta=2.0),
     dict(trans_b=1, alpha=-1.5, beta=0.25), dict(trans_b=1, dynamic_bias=True)],
)
def test_gemm(kwargs):
    before = gemm_model(**kwargs)
    after = normalize(gemm_model(**kwargs))
    onnx.checker.check_model(after, full_check=True)
    assert [n.op_type for n in after.graph.node] == ["MatMul", "Add"] if kwargs.get("bias", True) else ["MatMul"]
    assert linear_weights(after) == {"/fc/MatMul": (24, 16)}
    assert after.graph.node[-1].output[0] == "y"
    check_same_outputs(before, after)


def test_gemm_that_cannot_be_rewritten_is_kept():
    before = gemm_model(dynamic_bias=True, beta=2.0)
    after = normalize(gemm_model(dynamic_bias=True, beta=2.0))
    assert [n.op_type for n in after.graph.node] == ["Gemm"]
    check_same_outputs(before, after)


@pytest.mark.parametrize(
    "build", [transpose_weight_model, lambda: transpose_weight_model(constant=True), constant_weight_model]
)
def test_transposed_and_constant_weights_become_initializers(build):
    before, after = build(), normalize(build())
    onnx.checker.check_model(after, full_check=True)
    assert [n.op_type for n in after.graph.node] == ["MatMul"]
    assert linear_weights(after) == {"/fc/MatMul": (24, 16)}
    assert len(after.graph.initializer) == 1  # the untransposed source is gone
    check_same_outputs(before, after)


def test_tied_embedding_keeps_the_gather_table():
    before, after = tied_embedding_model(), normalize(tied_embedding_model())
    assert [n.op_type for n in after.graph.node] == ["Gather", "MatMul"]
    inits = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    np.testing.assert_array_equal(inits["/lm_head/Transpose_output_0"], inits["embed.weight"].T)
    check_same_outputs(before, after)


def test_unnamed_linear_nodes_get_names():
    model = matmul_model()
    for node in model.graph.node:
        node.name = ""
    names = [n.name for n in normalize(model).graph.node if n.op_type == "MatMul"]
    assert all(names) and len(set(names)) == 2


def test_already_normal_model_is_unchanged():
    model = matmul_model()
    nodes = [helper.printable_node(n) for n in model.graph.node]
    assert [helper.printable_node(n) for n in normalize(model).graph.node] == nodes


def test_unloaded_weights_are_a_clear_error(tmp_path):
    save_model_atomic(transpose_weight_model(), tmp_path / "m.onnx", external_data=True)
    with pytest.raises(OnnxqError, match="not loaded"):
        normalize(load_model(tmp_path / "m.onnx", load_weights=False))
