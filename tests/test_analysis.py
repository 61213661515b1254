"""Graph analysis: linear layers, block partition, attention maps on Llama, GPT-2, BERT and fused graphs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxq.analysis.layers import linear_layers, partition
from onnxq.analysis.attention import attention_blocks
from onnxq.errors import OnnxqError
from onnxq.graph.normalize import normalize
from onnxq.calibrate.runner import BlockRunner
from onnxq.runtime.session import make_session, model_feeds
from tests.tiny import tiny_bert_onnx, tiny_gpt2_onnx, tiny_llama_onnx


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return normalize(onnx.load(tiny_llama_onnx(tmp_path_factory.mktemp("llama"), layers=2, hidden=64, heads=4, kv_heads=2)))


def test_llama_linear_layers_and_blocks(llama):
    layers = linear_layers(llama)
    in_blocks = [l for l in layers if l.block is not None]
    assert len(in_blocks) == 2 * 7
    assert {l.role for l in in_blocks} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert [l.role for l in layers if l.block is None] == ["lm_head"]
    part = partition(llama)
    assert len(part.blocks) == 2
    covered = set(part.stem) | set(part.head) | {i for b in part.blocks for i in b}
    assert covered == set(range(len(llama.graph.node)))


def test_llama_attention_map(llama):
    att = attention_blocks(llama)
    assert len(att) == 2
    a = att[0]
    assert (a.n_heads, a.n_kv_heads, a.head_dim) == (4, 2, 16)
    assert a.causal is True and a.rope == "rotate_half"
    assert a.q.endswith("q_proj/MatMul") and a.k.endswith("k_proj/MatMul")
    assert a.v.endswith("v_proj/MatMul") and a.o.endswith("o_proj/MatMul")
    assert a.cos and a.sin and a.probs and a.q_tensor and a.k_tensor


def test_block_runner_matches_full_model(llama):
    """Running stem + blocks one at a time reproduces the full graph's last hidden state."""
    runner = BlockRunner(llama, partition(llama))
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 12)).astype(np.int64)
    envs = runner.start([ids])
    for b in range(len(runner.blocks)):
        for _ in runner.run(b, envs):
            pass
    (name,) = runner.blocks[-1].outputs
    full = onnx.ModelProto()
    full.CopyFrom(llama)
    full.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = make_session(full)
    ref = sess.run([name], model_feeds(sess, ids))[0]
    np.testing.assert_allclose(envs[0][name], ref, rtol=1e-5, atol=1e-5)


def test_block_runner_on_weights_left_in_the_file_runs_the_same(llama, tmp_path):
    """Weights read from the file (or passed as overrides) reach ORT as arrays: bit for bit the loaded model's runs."""
    from onnxq.graph.io import load_weightless, save_model_atomic

    save_model_atomic(llama, tmp_path / "m.onnx")
    lazy, store = load_weightless(tmp_path / "m.onnx")
    assert len(store.memory) > 0
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 12)).astype(np.int64)
    fake = {l.weight: np.full((l.k, l.n), 0.01, np.float32) for l in linear_layers(llama) if l.block == 0}
    outputs = []
    for runner in (BlockRunner(llama, partition(llama)), BlockRunner(lazy, partition(lazy), folder=store)):
        envs = runner.start([ids])
        for b in range(len(runner.blocks)):
            for _ in runner.run(b, envs, weights=fake if b == 0 else None):
                pass
        outputs.append(envs[0][runner.blocks[-1].outputs[0]])
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_block_runner_one_window_at_a_time_stacks_to_the_batched_run(llama):
    """ORT runs one window at a time, captures joined 4 at a time (attention rows cut to those sampled): the same
    arrays, bit for bit, as runs of 4 windows at once; and the environments stacked for block tuning too."""
    runner = BlockRunner(llama, partition(llama))
    a = attention_blocks(llama)[1]
    capture = [a.q_tensor, a.probs, a.v_input]
    rows = {a.probs: slice(3, None, 4)}
    ids = np.random.default_rng(0).integers(0, 256, size=(6, 12)).astype(np.int64)
    batched, single = runner.start([ids[:4], ids[4:]]), runner.start([ids[i : i + 1] for i in range(6)])
    for _ in runner.run(0, batched):
        pass
    for _ in runner.run(0, single):
        pass
    whole = list(runner.run(1, batched, capture=capture))
    joined = list(runner.run(1, single, capture=capture, group=4, rows=rows))
    assert [j[a.probs].shape[:3] for j in joined] == [(4, 4, 3), (2, 4, 3)]
    for w, j in zip(whole, joined):
        np.testing.assert_array_equal(w[a.q_tensor], j[a.q_tensor])
        np.testing.assert_array_equal(w[a.probs][:, :, 3::4], j[a.probs])
    feeds = runner.stacked(single, runner.blocks[1].outputs, 4)
    for env, feed in zip(batched, feeds):
        np.testing.assert_array_equal(env[runner.blocks[1].outputs[0]], feed[runner.blocks[1].outputs[0]])


def test_gpt2_fused_qkv(tmp_path):
    model = normalize(onnx.load(tiny_gpt2_onnx(tmp_path)))
    att = attention_blocks(model)
    assert len(att) >= 1
    a = att[0]
    assert a.fused_qkv is not None and a.q is None
    assert a.causal is True and a.rope is None
    assert a.o is not None


def test_bert_is_not_causal(tmp_path):
    model = normalize(onnx.load(tiny_bert_onnx(tmp_path)))
    att = attention_blocks(model)
    assert len(att) >= 1
    assert all(a.causal is False for a in att)
    assert att[0].q and att[0].k and att[0].v and att[0].o


def test_ort_fused_attention_is_recognised(tmp_path):
    """After ONNX Runtime's transformer optimizer fuses BERT attention, the fused op is still mapped."""
    from onnxruntime.transformers.optimizer import optimize_model

    src = tiny_bert_onnx(tmp_path)
    opt = optimize_model(str(src), model_type="bert", num_heads=4, hidden_size=64, opt_level=0)
    fused = opt.model
    kinds = {n.op_type for n in fused.graph.node if n.domain == "com.microsoft"}
    assert kinds & {"Attention", "MultiHeadAttention"}, kinds
    att = [a for a in attention_blocks(fused) if a.kind != "unfused"]
    assert att and att[0].n_heads == 4 and att[0].causal is False


def test_no_blocks_is_a_clear_error():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w],
    )
    with pytest.raises(OnnxqError, match="no decoder blocks"):
        partition(helper.make_model(g))


@pytest.mark.slow
def test_smollm2_attention_map():
    from onnxq.models.export import export_onnx

    model = onnx.load(export_onnx("smollm2"), load_external_data=False)
    att = attention_blocks(model)
    assert len(att) == 30
    assert {(a.n_heads, a.n_kv_heads, a.head_dim, a.causal, a.rope) for a in att} == {(9, 3, 64, True, "rotate_half")}
    assert len(partition(model).blocks) == 30
