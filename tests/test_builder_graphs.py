"""onnxruntime-genai builder graphs (GroupQueryAttention, packed QKV, fused norms) as .onnx inputs: the input check
accepts them, the analysis maps every block, and quantized files compute their fake-quant reference in ORT."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.analysis.layers import linear_layers, partition
from onnxq.analysis.attention import attention_blocks, cache_head_dims
from onnxq.deploy.builder import float_build
from onnxq.errors import OnnxqError
from onnxq.graph.io import check_graph, load_model
from onnxq.pipeline import quantize
from onnxq.recipe import QuantRecipe
from onnxq.runtime.session import make_session, model_feeds
from tests.helpers import fake_quant_reference
from tests.tiny import tiny_llama_hf

WINDOWS = np.random.default_rng(0).integers(2, 258, (4, 32))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the builder's float model.onnx of a tiny tied Llama, its HF config), built once in a module-wide cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONNXQ_CACHE", str(tmp_path_factory.mktemp("cache")))
        hf = tiny_llama_hf(tmp_path_factory.mktemp("hf"), tied=True)
        yield float_build(hf) / "model.onnx", json.loads((hf / "config.json").read_text())


def _graph(node: onnx.NodeProto, opset: int = 22) -> onnx.ModelProto:
    """x[2, 8] -> `node` (inputs x and a weight "w" [8]) -> y."""
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                          [numpy_helper.from_array(np.ones(8, np.float32), "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_input_check_accepts_ort_ops_and_refuses_unknown_ones(built):
    check_graph(load_model(built[0], load_weights=False), "model.onnx", ops=True)
    check_graph(_graph(helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y"], epsilon=1e-6)), ops=True)
    with pytest.raises(OnnxqError, match="'NoSuchNorm', which neither opset 22 of 'ai.onnx' nor ONNX Runtime defines"):
        check_graph(_graph(helper.make_node("NoSuchNorm", ["x", "w"], ["y"])), ops=True)
    with pytest.raises(OnnxqError, match="unknown attribute 'eps'"):  # ORT's schema is checked like ONNX's
        check_graph(_graph(helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y"], eps=1e-6)), ops=True)


def test_analysis_maps_every_block(built):
    path, config = built
    model = onnx.load(str(path), load_external_data=False)
    heads, kv, layers = config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]
    d = config["hidden_size"] // heads
    part = partition(model)
    assert len(part.blocks) == layers
    assert [model.graph.node[i].op_type for i in part.head] == ["SkipSimplifiedLayerNormalization", "MatMul"]
    att = attention_blocks(model)
    assert [a.block for a in att] == list(range(layers))
    for b, a in enumerate(att):
        assert (a.kind, a.n_heads, a.n_kv_heads, a.head_dim) == ("GroupQueryAttention", heads, kv, d)
        assert a.fused_qkv == f"/model/layers.{b}/attn/qkv_proj/MatMul" and a.o == f"/model/layers.{b}/attn/o_proj/MatMul"
        assert a.qkv_rows == ((0, heads * d), (heads * d, (heads + kv) * d), ((heads + kv) * d, (heads + 2 * kv) * d))
        assert (a.rope, a.rope_interleaved, a.cos, a.sin, a.causal) == ("fused", False, "cos_cache", "sin_cache", True)
    qkv = [l for l in linear_layers(model) if l.role == "qkv_proj"]
    assert [(l.block, l.n) for l in qkv] == [(b, (heads + 2 * kv) * d) for b in range(layers)]
    assert cache_head_dims(model) == {f"past_key_values.{b}.{t}": d for b in range(layers) for t in ("key", "value")}


def _logits(model: onnx.ModelProto | str, dims: dict[str, int], ids: np.ndarray) -> np.ndarray:
    session = make_session(model)
    return session.run(["logits"], model_feeds(session, ids, dims))[0]


@pytest.mark.parametrize("algo", ["rtn", "gptq", "turboboa"])
def test_quantized_file_computes_its_fake_quant_reference(built, tmp_path, algo):
    """Every block's five layers (packed qkv as one) are solved; ORT on the file equals the float builder graph
    holding the dequantized weights."""
    path, _ = built
    out = tmp_path / "q.onnx"
    recipe = QuantRecipe(algo=algo, bits=4, group_size=32, calib_windows=4, calib_seq_len=32)
    rep = quantize(path, recipe, out, windows=WINDOWS, progress=False)
    assert rep.layers == 10 and all(np.isfinite(v) for v in rep.layer_losses.values()) == (algo != "rtn")
    assert any("solved as plain layers" in n for n in rep.notes) == (algo == "turboboa")  # said, not silent
    reference = fake_quant_reference(onnx.load(str(path)), out)
    dims, ids = cache_head_dims(reference), WINDOWS[:2, :16]
    ref, got = _logits(reference, dims, ids), _logits(str(out), dims, ids)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4
    assert np.linalg.norm(got - _logits(str(path), dims, ids)) > 0  # the weights did change
