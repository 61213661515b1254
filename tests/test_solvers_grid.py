"""Grids, RTN and the QuantResult contract."""
import pytest
import torch

from onnxq.errors import OnnxqError
from onnxq.solvers import QuantSpec, find_grid, minmax_grid, mse_grid, solve_rtn
from onnxq.solvers.grid import _grouped, fake_quant, quant_error
from tests.problems import check_result, float_grid_weight

DT = torch.float64


def test_minmax_formula():
    W = torch.tensor([[-1.0, 0.5, 2.0, 0.0], [0.5, 1.0, 0.25, 0.75], [0, 0, 0, 0], [-3.0, -1.0, 0.5, 1.0]], dtype=DT)
    s, z = minmax_grid(W, QuantSpec(2, -1, False))
    assert torch.allclose(s[:, 0], torch.tensor([1.0, 1 / 3, 2 / 3, 4 / 3], dtype=DT))
    assert torch.equal(z[:, 0], torch.round(torch.tensor([1.0, 0.0, 1.5, 2.25], dtype=DT)))
    s, z = minmax_grid(W, QuantSpec(3, -1, True))
    assert torch.allclose(s[:, 0], torch.tensor([4 / 7, 2 / 7, 2 / 7, 6 / 7], dtype=DT)) and (z == 4).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [-1, 16, 32])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("grid", ["minmax", "mse", "hessian"])
def test_rtn_contract_and_rounding(bits, gs, sym, grid):
    torch.manual_seed(bits * 7 + gs)
    W = torch.randn(12, 40, dtype=DT)  # 40 = 2.5 groups of 16: ragged last group
    X = torch.randn(40, 200, dtype=DT)
    spec = QuantSpec(bits, gs, sym)
    res = solve_rtn(W, spec, grid=grid, H=X @ X.T)
    check_result(res, W, spec)
    g = torch.arange(40) // spec.width(40)
    step, inside = res.scales[:, g].double(), (res.codes > 0) & (res.codes < spec.maxq)
    assert ((res.qweight.double() - W).abs()[inside] <= step[inside] / 2 + 1e-6).all()  # nearest unclipped point
    if grid == "minmax":  # the min-max range covers W: no clipping beyond one step
        assert ((res.qweight.double() - W).abs() <= step + 1e-6).all()


def test_mse_grid_never_worse_than_minmax():
    torch.manual_seed(0)
    W = torch.randn(16, 48, dtype=DT) * torch.rand(16, 1, dtype=DT)
    W[0, 0] = 9.0  # an outlier makes shrinking pay off
    for spec in (QuantSpec(3, -1, False), QuantSpec(2, 16, False), QuantSpec(4, 16, True)):
        Wg = _grouped(W, spec.width(48))

        def err(s, z):
            return (fake_quant(Wg, s[..., None], z[..., None], spec.maxq)[0] - Wg).abs().pow(2.4).sum(-1)

        e_mse, e_mm = err(*mse_grid(W, spec)), err(*minmax_grid(W, spec))
        assert (e_mse <= e_mm + 1e-12).all() and (e_mse < e_mm).any()


def test_float32_and_float64_inputs():
    W = torch.randn(8, 32)
    for w in (W, W.double()):
        res = solve_rtn(w, QuantSpec(4, 16, False))
        check_result(res, w, QuantSpec(4, 16, False))


def test_errors():
    with pytest.raises(OnnxqError):
        find_grid(torch.randn(4, 8), QuantSpec(4, -1, False), "hessian")
    with pytest.raises(OnnxqError):
        find_grid(torch.randn(4, 8), QuantSpec(4, -1, False), "bogus")
    with pytest.raises(OnnxqError):
        QuantSpec(4, 0, False)


def test_hessian_grid_top_k_prefilter():
    """The diagonal pre-filter keeps the exact search when top_k covers all candidates and stays close otherwise."""
    from onnxq.solvers import hessian_weighted_grid
    from onnxq.solvers.grid import fake_quant

    torch.manual_seed(0)
    X = torch.randn(512, 64, dtype=torch.float64) @ (torch.eye(64, dtype=torch.float64) + 0.3 * torch.randn(64, 64, dtype=torch.float64))
    H = X.T @ X / 512
    W = torch.randn(12, 64, dtype=torch.float64)
    spec = QuantSpec(3, 32, False)
    exact = hessian_weighted_grid(W, H, spec)
    every = hessian_weighted_grid(W, H, spec, top_k=200)
    assert all(torch.equal(a, b) for a, b in zip(exact, every))

    def loss(S, Z):
        Q = torch.cat([fake_quant(W[:, g * 32:(g + 1) * 32], S[:, g:g + 1], Z[:, g:g + 1], spec.maxq)[0] for g in range(2)], 1)
        D = Q - W
        return sum(float((D[:, g * 32:(g + 1) * 32] @ H[g * 32:(g + 1) * 32, g * 32:(g + 1) * 32] * D[:, g * 32:(g + 1) * 32]).sum()) for g in range(2))

    assert loss(*hessian_weighted_grid(W, H, spec, top_k=48)) <= 1.02 * loss(*exact)


@pytest.mark.parametrize("grid", ["minmax", "mse", "hessian"])
def test_float_zero_grid_recovers_an_offset_grid_exactly(grid):
    """A weight on per-group grids that exclude 0 (n = 40 ragged for groups of 16): float zeros reproduce it to
    rounding error, integer zeros cannot (their ranges must contain 0)."""
    W = float_grid_weight()
    H = torch.eye(40, dtype=torch.float64) + 0.1
    exact = solve_rtn(W, QuantSpec(3, 16, False, float_zero=True), grid=grid, H=H)
    assert exact.zeros.is_floating_point() and (exact.qweight.double() - W).abs().max() < 1e-5
    torch.testing.assert_close(exact.qweight, ((exact.codes - exact.zeros[:, torch.arange(40) // 16]) * exact.scales[:, torch.arange(40) // 16]))
    integer = solve_rtn(W, QuantSpec(3, 16, False), grid=grid, H=H)
    assert (integer.qweight.double() - W).abs().max() > 1e-2


def test_fake_quant_integer_zero_is_unchanged():
    """Integer zeros: clamp(round(w/s) + z) exactly, ties included (w/s = k + 0.5 with odd z)."""
    w = torch.tensor([0.5, 1.5, -0.5, 2.5, 0.26, 7.0])
    q, code = fake_quant(w, torch.tensor(1.0), torch.tensor(3.0), 7)
    torch.testing.assert_close(code, torch.clamp(torch.round(w) + 3, 0, 7))


def test_float_zero_spec_errors():
    with pytest.raises(OnnxqError, match="asymmetric"):
        QuantSpec(4, 16, True, float_zero=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("float_zero", [False, True])
def test_quant_error_is_fake_quant_minus_w_bit_for_bit(dtype, float_zero):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 4, 32, generator=g, dtype=dtype)
    s = torch.rand(64, 4, 1, generator=g, dtype=dtype) * 0.3 + 0.05
    z = torch.rand(64, 4, 1, generator=g, dtype=dtype) * 15
    z = z if float_zero else z.round()
    w0 = w.clone()
    want = fake_quant(w, s, z, 15)[0] - w
    got = quant_error(w, s, z, 15)
    assert torch.equal(got, want) and torch.equal(w, w0)  # same bits, and w is not overwritten
