"""The residual-stream rotation pass: orthogonal matrices, the traced plan, and an unchanged function (ORT logits)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxq.analysis.attention import attention_blocks
from onnxq.errors import OnnxqError
from onnxq.graph.normalize import normalize
from onnxq.analysis.layers import linear_layers
from onnxq.preprocess.rotate import (
    ROTATION_TAG, hadamard, hadamard_factors, is_hadamard_order, random_rotation, residual_plan, rotate_residual,
)
from tests.tiny import tiny_bert_onnx, tiny_gpt2_onnx, tiny_llama_onnx


@pytest.mark.parametrize("n", [1, 2, 12, 24, 64, 144, 576])
def test_hadamard_is_orthogonal_with_equal_magnitudes(n):
    h = hadamard(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-12)


def test_no_hadamard_for_other_orders_but_a_rotation_anyway():
    assert hadamard(20) is None and hadamard(96 * 5) is None
    assert all(is_hadamard_order(n) == (hadamard(n) is not None) for n in range(1, 300))
    r = random_rotation(20, np.random.default_rng(0))
    np.testing.assert_allclose(r @ r.T, np.eye(20), atol=1e-12)
    a, b = random_rotation(64, np.random.default_rng(1)), random_rotation(64, np.random.default_rng(2))
    assert not np.allclose(a, b)  # random signs differ by seed


def _with_random_norm_scales(path, seed=0):
    """The tiny Llama with its own random scale per RMSNorm, as a trained model has (HF initialises them to 1 and the
    export shares that one tensor through Identity nodes, which would hide a missing or shared fold)."""
    model = normalize(onnx.load(path))
    rng = np.random.default_rng(seed)
    for node in model.graph.node:
        if node.op_type == "Mul" and "norm" in node.name and "norm.weight" in node.input[0] + node.input[1]:
            k = 0 if "norm.weight" in node.input[0] else 1
            name = f"{node.name}.scale"
            model.graph.initializer.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, 96).astype(np.float32), name))
            node.input[k] = name
    return model


def _logits(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    names = [i.name for i in sess.get_inputs()]
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(ids.shape[1])[None].repeat(len(ids), 0)
    return sess.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _with_random_norm_scales(tiny_llama_onnx(tmp_path_factory.mktemp("rot"), layers=3, hidden=96, heads=4,
                                                    kv_heads=2, intermediate=192))


def test_plan_finds_every_norm_reader_and_writer(llama):
    plan = residual_plan(llama)
    assert plan.hidden == 96
    assert len(plan.norms) == 6 and len(plan.writers) == 6  # input and post-attention norm of 3 blocks
    readers = [n.readers for n in plan.norms]
    assert all(len(ws) == 3 for ws in readers[0::2]) and all(len(ws) == 2 for ws in readers[1::2])  # qkv; gate/up
    assert all(b is None for _, b in plan.writers)
    assert set(plan.tensors()) <= {t.name for t in llama.graph.initializer}
    assert len({n.scale for n in plan.norms}) == 6


def test_shared_scales_through_identity(tmp_path):
    """The export aliases one scale tensor for every norm, the final one included (HF initialises them all to 1):
    with that shared scale made random, folding it must not change the final norm, which is not folded."""
    model = normalize(onnx.load(tiny_llama_onnx(tmp_path, layers=2, hidden=96, heads=4, kv_heads=2, intermediate=192)))
    plan = residual_plan(model)
    assert len(plan.norms) == 4 and len({n.scale for n in plan.norms}) == 1
    shared = next(t for t in model.graph.initializer if t.name == plan.norms[0].scale)
    values = np.random.default_rng(5).uniform(0.5, 1.5, 96).astype(np.float32)
    shared.CopyFrom(numpy_helper.from_array(values, shared.name))
    ids = np.random.default_rng(0).integers(0, 256, (1, 12))
    want = _logits(model, ids)
    got = _logits(rotate_residual(model, plan, seed=1), ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("heads", [False, True])
def test_rotation_keeps_the_logits(llama, heads):
    rotated = onnx.ModelProto()
    rotated.CopyFrom(llama)
    blocks = attention_blocks(rotated)
    weights = {n.name: n.input[1] for n in rotated.graph.node if n.op_type == "MatMul"}
    r2 = [(weights[b.v], weights[b.o], b.head_dim) for b in blocks] if heads else []
    rotate_residual(rotated, residual_plan(rotated), seed=3, heads=r2)
    ids = np.random.default_rng(0).integers(0, 256, (2, 20))
    want, got = _logits(llama, ids), _logits(rotated, ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    inits = {t.name: numpy_helper.to_array(t) for t in rotated.graph.initializer}
    before = {t.name: numpy_helper.to_array(t) for t in llama.graph.initializer}
    plan = residual_plan(llama)
    reads = {n.output[0]: list(n.input) for n in rotated.graph.node}
    np.testing.assert_array_equal(inits[f"{ROTATION_TAG}.ones"], 1.0)
    for norm in plan.norms:
        assert f"{ROTATION_TAG}.ones" in reads[norm.node] and norm.scale not in inits  # folded, old scale dropped
        assert not np.allclose(inits[norm.readers[0]], before[norm.readers[0]])  # rotated
    if heads:  # R2 changed the values' columns beyond what R1 alone gives
        alone = onnx.ModelProto()
        alone.CopyFrom(llama)
        rotate_residual(alone, residual_plan(alone), seed=3)
        v = weights[blocks[0].v]
        assert not np.allclose(inits[v], numpy_helper.to_array(next(t for t in alone.graph.initializer if t.name == v)))
    assert sum(ROTATION_TAG in n.name for n in rotated.graph.node) == 2


@pytest.mark.parametrize("make", [tiny_gpt2_onnx, tiny_bert_onnx])
def test_layernorm_models_are_refused_in_one_line(tmp_path, make):
    model = normalize(onnx.load(make(tmp_path)))
    with pytest.raises(OnnxqError, match="--rotate: .*drop --rotate") as err:
        residual_plan(model)
    assert "\n" not in str(err.value)


def test_a_model_without_blocks_is_refused_not_left_unrotated(tmp_path):
    """The embedding straight into the final norm: no block to rotate, said in one line (before, a plan with R and Rᵀ
    at the same tensor rotated nothing)."""
    model = normalize(onnx.load(tiny_llama_onnx(tmp_path, layers=0)))
    with pytest.raises(OnnxqError, match="reaches a norm but no decoder block: .*drop --rotate"):
        residual_plan(model)


@pytest.mark.parametrize("n, inner, nb", [(192, 128, 16), (192, 4, 4), (1536, 128, 128), (256, 128, 128), (12, 128, 1)])
def test_hadamard_factors_make_a_hadamard_matrix(n, inner, nb):
    a, b = hadamard_factors(n, np.random.default_rng(0), inner=inner)
    assert len(b) == nb
    h = np.kron(a, b)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-12)
    assert hadamard_factors(20, np.random.default_rng(0)) is None


def test_online_hadamard_before_down_proj_keeps_the_logits(llama):
    rotated = onnx.ModelProto()
    rotated.CopyFrom(llama)
    plan = residual_plan(rotated)
    blocks = attention_blocks(rotated)
    weights = {n.name: n.input[1] for n in rotated.graph.node if n.op_type == "MatMul"}
    o_weights = {weights[b.o] for b in blocks}
    down = [w for w, _ in plan.writers if w not in o_weights]
    assert len(down) == 3
    rotate_residual(rotated, plan, seed=2, online=down)
    ids = np.random.default_rng(1).integers(0, 256, (2, 20))
    want, got = _logits(llama, ids), _logits(rotated, ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    layers = [l for l in linear_layers(rotated) if ROTATION_TAG in l.node and l.block is not None]
    assert len(layers) == 3 and {l.block for l in layers} == {0, 1, 2}  # one online MatMul per block, in its block
    assert sum(ROTATION_TAG in n.name for n in rotated.graph.node) == 2 + 3 * 5
    alone = onnx.ModelProto()
    alone.CopyFrom(llama)
    rotate_residual(alone, residual_plan(alone), seed=2)  # the same R1, no R4
    r1_only = {t.name: numpy_helper.to_array(t) for t in alone.graph.initializer}
    inits = {t.name: numpy_helper.to_array(t) for t in rotated.graph.initializer}
    assert all(not np.allclose(inits[w], r1_only[w]) for w in down)
    assert all(np.allclose(np.linalg.norm(inits[w], axis=0), np.linalg.norm(r1_only[w], axis=0)) for w in down)


def test_online_hadamard_skips_widths_without_one(tmp_path):
    model = normalize(onnx.load(tiny_llama_onnx(tmp_path, layers=1, hidden=96, heads=4, kv_heads=2, intermediate=160)))
    plan = residual_plan(model)
    down = plan.writers[1][0]
    want = _logits(model, ids := np.random.default_rng(2).integers(0, 256, (1, 10)))
    rotate_residual(model, plan, seed=0, online=[down])
    assert sum(ROTATION_TAG in n.name for n in model.graph.node) == 2  # R1 only: 160 = 2^5 * 5 has no Hadamard
    got = _logits(model, ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
