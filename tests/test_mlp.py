"""Gated-MLP analysis and the up projection's MLP row Hessian (`--up-row-factor`)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from onnxq import QuantRecipe
from onnxq.analysis.layers import linear_layers
from onnxq.analysis.mlp import gated_mlps, product_map
from onnxq.graph.normalize import normalize
from onnxq.preprocess.rotate import residual_plan, rotate_residual
from onnxq.pipeline import quantize
from onnxq.solvers import layer_loss, up_row_hessian
from tests.tiny import tiny_llama_onnx


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama_onnx(tmp_path_factory.mktemp("mlp"), layers=2, hidden=64, heads=4, kv_heads=2, intermediate=192)


def test_up_row_hessian_is_exact_for_a_fixed_activation():
    """With the same activation a on every token the Kronecker form is exact: tr(H_out ΔW H_in ΔWᵀ) with
    H_out = (J Jᵀ) ⊙ a aᵀ and H_in = Σ x xᵀ equals Σ_t ||(a ⊙ ΔW x_t) J||²."""
    g = torch.Generator().manual_seed(0)
    d_ff, d_model, n, T = 12, 5, 8, 40
    J, W = torch.randn(d_ff, d_model, generator=g, dtype=torch.float64), torch.randn(d_ff, n, generator=g, dtype=torch.float64)
    Q, X = W + 0.1 * torch.randn(d_ff, n, generator=g, dtype=torch.float64), torch.randn(T, n, generator=g, dtype=torch.float64)
    a = torch.randn(d_ff, generator=g, dtype=torch.float64)
    direct = float(((((Q - W) @ X.T).T * a) @ J).square().sum())
    kron = layer_loss(W, Q, X.T @ X, up_row_hessian(J, a[:, None] * a[None, :]))
    assert kron == pytest.approx(direct, rel=1e-10)


def test_gated_mlps_find_up_down_and_the_activation(llama):
    model = onnx.load(llama, load_external_data=False)
    found = gated_mlps(model)
    assert [m.block for m in found] == [0, 1]
    for m in found:
        assert "up_proj" in m.up and "down_proj" in m.down and "act_fn" in m.act
        assert m.down_input == m.product  # nothing between the gated product and the down projection
        assert product_map(model, m, 192, numpy_helper.to_array) is None


def test_row_hessian_is_unchanged_by_rotate(llama):
    """After --rotate (R1 on the output, R4's online Hadamard on the input) the map from the gated product to the
    MLP output, J = P·W_down, still has the float model's J Jᵀ; P is orthogonal and down_input = product @ P."""
    model = normalize(onnx.load(llama), keep_tied=True)
    down = lambda m, mlp: numpy_helper.to_array(  # noqa: E731
        {t.name: t for t in m.graph.initializer}[next(l.weight for l in linear_layers(m) if l.node == mlp.down)]).astype(np.float64)
    before = gated_mlps(model)[0]
    JJ = down(model, before) @ down(model, before).T
    online = [l.weight for l in linear_layers(model) if l.role == "down_proj"]
    assert len(online) == 2
    rotated = rotate_residual(model, residual_plan(model), seed=3, online=online)
    after = gated_mlps(rotated)[0]
    assert after.down_input != after.product and after.up == before.up
    P = product_map(rotated, after, 192, numpy_helper.to_array).astype(np.float64)
    assert np.abs(P @ P.T - np.eye(192)).max() < 1e-5
    J = P @ down(rotated, after)
    assert np.abs(J @ J.T - JJ).max() < 1e-4 * np.abs(JJ).max()


def test_up_row_factor_changes_only_up(llama, tmp_path):
    """--up-row-factor re-solves only the up projections: block 0's other layers are byte-identical; refused for
    solvers other than TurboBoA."""
    def weights(up):
        out = tmp_path / f"up-{up}.onnx"
        windows = np.random.default_rng(0).integers(0, 256, size=(8, 32)).astype(np.int64)
        quantize(llama, QuantRecipe(algo="turboboa", bits=3, group_size=32, format="qdq", up_row_factor=up,
                                    rows_per_block=4), out, windows=windows, progress=False)
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer if t.name.endswith("weight_q")}

    a, b = weights(False), weights(True)
    block0 = [k for k in a if "layers.0/" in k]
    assert len(block0) == 7
    for k in block0:
        assert np.array_equal(a[k], b[k]) != ("up_proj" in k), k
    with pytest.raises(Exception, match="TurboBoA option"):
        QuantRecipe(algo="gptq", up_row_factor=True).validate()
