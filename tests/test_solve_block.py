"""solve_block: a block's layers solved side by side give the results of solving them one after another."""
from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch

import onnxq.solve.dispatch
import onnxq.solve.loop
from onnxq import OnnxqError, QuantRecipe
from onnxq.analysis.layers import LinearLayer
from onnxq.solve.dispatch import BlockStats, solve_block, solve_layer
from onnxq.calibrate.stats import Covariance


def _block(seed=0):
    """Five layers over two inputs of a block, random weights and residual statistics (a float stream)."""
    rng = np.random.default_rng(seed)
    dims = {"x": 48, "h": 96}
    stats = BlockStats(cov={n: Covariance(d, residual=True) for n, d in dims.items()})
    for n, d in dims.items():
        mix = rng.standard_normal((d, d)) / d**0.5 + np.eye(d)
        x = (rng.standard_normal((256, d)) @ mix).astype(np.float32)
        stats.cov[n].add(x, x + 0.05 * rng.standard_normal(x.shape).astype(np.float32))
    shapes = [("x", 48, 64), ("x", 48, 16), ("x", 48, 16), ("x", 48, 96), ("h", 96, 48)]
    layers = [LinearLayer(f"n{i}", f"w{i}", inp, k, n, 0, "linear") for i, (inp, k, n) in enumerate(shapes)]
    weights = [torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32) * 0.1) for _, k, n in shapes]
    return layers, weights, stats


class _InThread:
    """A helper lane without a process, so a monkeypatched solve_layer reaches it."""

    def solve(self, *args):
        try:
            return True, onnxq.solve.dispatch.solve_layer(*args)
        except Exception as err:
            return False, err


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("algo", ["gptq", "turboboa"])
def test_side_by_side_equals_one_after_another(two_threads, algo):
    layers, weights, stats = _block()
    recipe = QuantRecipe(algo=algo, bits=3, group_size=16).validate()
    torch.set_num_threads(1)
    one = [solve_layer(l, W, stats, recipe) for l, W in zip(layers, weights)]
    torch.set_num_threads(2)
    both = solve_block(layers, weights, stats, recipe)
    assert torch.get_num_threads() == 2  # the one-thread setting of the workers is undone
    assert len(both) == len(one)
    for (r1, l1), (r2, l2) in zip(one, both):
        assert torch.equal(r1.qweight, r2.qweight) and torch.equal(r1.codes, r2.codes) and l1 == l2


def test_a_failing_layer_stops_the_block(two_threads, monkeypatch):
    layers, weights, stats = _block()
    calls = []
    real = onnxq.solve.dispatch.solve_layer

    def fail_on_first(layer, *args):
        calls.append(layer.node)
        if layer.node == "n3":  # the largest layer: submitted first
            raise OnnxqError("layer n3: boom")
        time.sleep(0.2)  # the others take a while, as real layers do
        return real(layer, *args)

    monkeypatch.setattr(onnxq.solve.dispatch, "solve_layer", fail_on_first)
    monkeypatch.setattr(onnxq.solve.dispatch, "_helpers", lambda n: [_InThread() for _ in range(n)])
    with pytest.raises(OnnxqError, match="layer n3: boom"):
        solve_block(layers, weights, stats, QuantRecipe(algo="gptq", bits=4, group_size=16).validate())
    assert calls[0] == "n3" and len(calls) < len(layers)  # the layers not started were dropped
    assert torch.get_num_threads() == 2


def test_pipeline_with_lanes_writes_the_same_model(tmp_path, two_threads, monkeypatch):
    """End to end on a tiny Llama with 2 threads: helper processes in the loop give the file of one after another."""
    from onnxq.pipeline import quantize
    from tests.tiny import tiny_llama_onnx

    model = tiny_llama_onnx(tmp_path)
    windows = np.random.default_rng(0).integers(0, 256, (8, 32))
    recipe = QuantRecipe(algo="turboboa", bits=3, group_size=32)
    report = quantize(model, recipe, tmp_path / "lanes.onnx", windows=windows, progress=False)
    if sys.platform == "linux":  # the helper's own peak is reported beside this process's (it imports torch: > 50 MiB)
        assert report.helper_rss_mb > 50
    monkeypatch.setattr(onnxq.solve.loop, "solve_block",
                        lambda layers, weights, stats, r: [solve_layer(l, W, stats, r) for l, W in zip(layers, weights)])
    quantize(model, recipe, tmp_path / "one.onnx", windows=windows, progress=False)
    assert (tmp_path / "lanes.onnx").read_bytes() == (tmp_path / "one.onnx").read_bytes()


def test_helpers_that_cannot_start_leave_the_work_here(two_threads, monkeypatch):
    def no_process(self):
        raise OSError("no processes here")

    monkeypatch.setattr(onnxq.solve.dispatch, "_HELPERS", [])
    monkeypatch.setattr(onnxq.solve.dispatch._Helper, "__init__", no_process)
    layers, weights, stats = _block()
    recipe = QuantRecipe(algo="gptq", bits=4, group_size=16).validate()
    got = solve_block(layers, weights, stats, recipe)
    torch.set_num_threads(1)
    want = [solve_layer(l, W, stats, recipe) for l, W in zip(layers, weights)]
    assert all(torch.equal(a.qweight, b.qweight) for (a, _), (b, _) in zip(got, want))


def test_a_solver_error_in_a_helper_is_raised_and_keeps_the_helper(two_threads):
    layers, weights, stats = _block()
    bad = QuantRecipe(algo="gptq", bits=4, group_size=16)  # not validated: no grid, the solver refuses
    with pytest.raises(OnnxqError, match="unknown grid search"):
        solve_block(layers, weights, stats, bad)
    helper = onnxq.solve.dispatch._helpers(1)[0]
    ok, err = helper.solve(layers[0], weights[0], stats, bad)
    assert not ok and isinstance(err, OnnxqError) and helper.proc.poll() is None


@pytest.mark.parametrize("algo", ["gptq", "rtn", "turboboa"])
def test_solve_kept_in_row_pieces_matches_one_solve(algo, monkeypatch):
    layers, weights, stats = _block()
    layer, W = layers[3], weights[3]  # 96 rows: pieces of 40, 40 and 16 rows
    grid = "hessian" if algo == "rtn" else None  # calibrated RTN: its bias correction needs the statistics
    recipe = QuantRecipe(algo=algo, bits=4, group_size=16, bias_correction=True, grid=grid).validate()
    whole, whole_loss = solve_layer(layer, W, stats, recipe)
    monkeypatch.setattr(onnxq.solve.loop, "ROW_PIECE", 40)
    kept, loss = onnxq.solve.loop.solve_kept(layer, W, stats, recipe)
    assert torch.equal(kept.unpacked(), whole.codes.to(torch.uint8)) and torch.equal(kept.scales, whole.scales)
    assert torch.equal(kept.zeros, whole.zeros) and torch.equal(kept.bias, whole.bias)
    assert loss == pytest.approx(whole_loss, rel=1e-9)
