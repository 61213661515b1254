"""The torch block evaluator against ONNX Runtime, and block-output tuning (`--block-tune`)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from onnxq.analysis.layers import linear_layers, partition
from onnxq.solve.block_tune import tune_block
from onnxq.errors import OnnxqError
from onnxq.graph.io import load_model
from onnxq.graph.normalize import normalize
from onnxq.pipeline import quantize
from onnxq.recipe import QuantRecipe
from onnxq.calibrate.runner import BlockRunner
from onnxq.solvers import QuantSpec, solve_rtn
from onnxq.solve.torch_graph import TorchGraph
from tests.tiny import matmul_model, tiny_gpt2_onnx, tiny_llama_onnx


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama_onnx(tmp_path_factory.mktemp("tune"), layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128)


@pytest.fixture(scope="module")
def block1(llama):
    """Block 1 of the tiny Llama: its runner, the quantized-stream feeds at its inputs, and its linear layers."""
    proto = normalize(load_model(llama))
    runner = BlockRunner(proto, partition(proto))
    rng = np.random.default_rng(0)
    envs = runner.start([rng.integers(0, 256, size=(2, 24)).astype(np.int64) for _ in range(3)])
    for _ in runner.run(0, envs):
        pass
    layers = [l for l in linear_layers(proto) if l.block == 1]
    return runner, envs, layers


@pytest.mark.parametrize("export", [tiny_llama_onnx, tiny_gpt2_onnx])
def test_torch_graph_matches_onnx_runtime_on_a_block(export, tmp_path):
    """Every op of an exported Llama (RoPE, GQA expand, causal mask, RMSNorm, SiLU) and GPT-2 (fused QKV Split, tanh
    GELU, LayerNorm) block evaluates in torch to within float32 rounding of ORT."""
    proto = normalize(load_model(export(tmp_path)))
    runner = BlockRunner(proto, partition(proto))
    envs = runner.start([np.random.default_rng(0).integers(0, 256, size=(2, 24)).astype(np.int64)])
    for _ in runner.run(0, envs):
        pass
    graph, sub = TorchGraph(runner.piece(1)), runner.blocks[1]
    want = next(runner.run(1, [dict(envs[0])], capture=sub.outputs, advance=False))
    got = graph({k: envs[0][k] for k in graph.inputs})
    for name, out in zip(sub.outputs, got):
        assert np.abs(out.numpy() - want[name]).max() <= 1e-4 * np.abs(want[name]).max()


def test_torch_graph_refuses_an_unknown_op():
    model = matmul_model()
    model.graph.node[1].op_type = "Celu"
    with pytest.raises(OnnxqError, match="does not know op.*Celu"):
        TorchGraph(model)


def _rtn_block(block1):
    """Block 1 as a torch graph, its layers quantized W2 g32 (float zero points) by RTN, and its calibration feeds."""
    runner, envs, layers = block1
    graph = TorchGraph(runner.piece(1))
    init = {t.name: t for t in runner.piece(1).graph.initializer}
    spec = QuantSpec(bits=2, group_size=32, sym=False, float_zero=True)
    results = {l.weight: solve_rtn(torch.from_numpy(numpy_helper.to_array(init[l.weight]).T.copy()), spec) for l in layers}
    return graph, results, [{k: env[k] for k in graph.inputs} for env in envs]


def test_tune_block_lowers_the_block_output_error_with_codes_fixed(block1):
    """On block 1 at W2 (float zero points), tuning lowers the mean squared error of the block's output against the
    float block on the same inputs; codes stay, scales and zero points move; a loss that cannot fall returns the
    results unchanged."""
    graph, results, feeds = _rtn_block(block1)
    tuned, before, after = tune_block(graph, feeds, results, epochs=20, lr=1e-2)
    assert after < 0.9 * before
    for name, r in results.items():
        assert torch.equal(tuned[name].codes, r.codes)
        assert not torch.equal(tuned[name].scales, r.scales)
    same, b2, a2 = tune_block(graph, feeds, results, epochs=0)
    assert a2 == b2 and all(same[n] is results[n] for n in results)


def test_tune_block_blends_the_float_stream_into_its_target(block1):
    """With `alpha`, the target is (1 - alpha) * float block on the feeds + alpha * the given float-stream outputs: the
    loss before tuning is the mean squared error against that blend, and tuning toward it lowers it."""
    graph, results, feeds = _rtn_block(block1)
    rng = np.random.default_rng(2)
    float_outputs = [[o.numpy() + rng.normal(0, 0.5, o.shape).astype(np.float32) for o in graph(f)] for f in feeds]
    alpha = 0.75
    _, before, _ = tune_block(graph, feeds, results, epochs=0, float_outputs=float_outputs, alpha=alpha)
    fake = {n: (r.qweight.T).float() for n, r in results.items()}
    with torch.no_grad():
        want = np.mean([np.mean([(((1 - alpha) * t.numpy() + alpha * u - q.numpy()) ** 2).mean()
                                 for t, u, q in zip(graph(f), us, graph(f, fake))]) for f, us in zip(feeds, float_outputs)])
    assert before == pytest.approx(want, rel=1e-5)
    blended, b1, a1 = tune_block(graph, feeds, results, epochs=20, lr=1e-2, float_outputs=float_outputs, alpha=alpha)
    plain, _, _ = tune_block(graph, feeds, results, epochs=20, lr=1e-2)
    assert a1 < b1
    assert any(not torch.equal(blended[n].scales, plain[n].scales) for n in results)


@pytest.mark.parametrize("algo", ["gptq", "turboboa"])
def test_block_tune_alpha_runs_in_the_pipeline(llama, tmp_path, algo):
    """`block_tune_alpha` with a float stream kept for tuning only (GPTQ) and with TurboBoA's own (advanced by the
    calibration pass rather than after the solve): recorded in the file, and the scales differ from alpha 0; refused
    outside [0, 1]."""
    windows = np.random.default_rng(1).integers(0, 256, size=(8, 32)).astype(np.int64)

    def run(alpha):
        out = tmp_path / f"alpha-{algo}-{alpha}.onnx"
        quantize(llama, QuantRecipe(algo=algo, bits=2, group_size=32, format="qdq", block_tune=3, block_tune_alpha=alpha,
                                    rows_per_block=4), out, windows=windows, progress=False)
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}, onnx.load(out)

    (a, _), (b, model) = run(0.0), run(1.0)
    assert {p.key: p.value for p in model.metadata_props}["onnxq.block_tune_alpha"] == "1.0"
    scales = [k for k in a if k.endswith("weight_scale")]
    assert any(not np.array_equal(a[k], b[k]) for k in scales)
    for bad in (-0.1, 1.5):
        with pytest.raises(OnnxqError, match="--block-tune-alpha"):
            QuantRecipe(algo="gptq", block_tune=2, block_tune_alpha=bad).validate()


def test_block_tune_runs_in_the_pipeline(llama, tmp_path):
    """`block_tune` on a TurboBoA run with output biases (tuned with them, targets without): the file records it,
    block 0's codes are the untuned run's, its scales are not; refused for RTN and negative epochs."""
    windows = np.random.default_rng(1).integers(0, 256, size=(8, 32)).astype(np.int64)

    def run(epochs):
        out = tmp_path / f"tune-{epochs}.onnx"
        quantize(llama, QuantRecipe(algo="turboboa", bits=2, group_size=32, format="qdq", block_tune=epochs,
                                    bias_correction=True, rows_per_block=4), out, windows=windows, progress=False)
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}, onnx.load(out)

    (a, _), (b, model) = run(0), run(3)
    assert {p.key: p.value for p in model.metadata_props}["onnxq.block_tune"] == "3"
    codes = [k for k in a if "layers.0/" in k and k.endswith("weight_q")]
    scales = [k for k in a if "layers.0/" in k and k.endswith("weight_scale")]
    assert len(codes) == 7 and len(scales) == 7
    assert all(np.array_equal(a[k], b[k]) for k in codes)
    assert any(not np.array_equal(a[k], b[k]) for k in scales)
    with pytest.raises(OnnxqError, match="--block-tune"):
        QuantRecipe(algo="rtn", block_tune=2).validate()
    with pytest.raises(OnnxqError, match="--block-tune"):
        QuantRecipe(block_tune=-1).validate()
