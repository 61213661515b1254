"""GPTQ / GPTAQ and the shared OBS engine."""
import itertools

import pytest
import torch

from onnxq.errors import OnnxqError
from onnxq.solvers import QuantSpec, find_grid, layer_loss, obs_quantize, solve_gptq, solve_rtn
from onnxq.solvers.engine import gptaq_term
from onnxq.solvers.grid import fake_quant
from onnxq.solvers.hessian import factor
from tests.problems import check_result, problem

DT = torch.float64


def dynamic_minmax(spec, gs):
    """Engine grid callback: min-max of the current columns [c, c+gs) (dynamic groups)."""
    one = QuantSpec(spec.bits, -1, spec.sym)
    return lambda c, Wc: tuple(t[..., 0] for t in find_grid(Wc, one, "minmax")), gs


def unblocked(W, U, spec, gs, P=None):
    """Reference: the textbook column loop, full trailing update after every column, grid from current weights."""
    W, Q = W.clone(), torch.zeros_like(W)
    one = QuantSpec(spec.bits, -1, spec.sym)
    for c in range(W.shape[1]):
        if c % gs == 0:
            s, z = (t[:, 0] for t in find_grid(W[:, c : c + gs], one, "minmax"))
        w = W[:, c].clone()
        Q[:, c] = fake_quant(w, s, z, spec.maxq)[0]
        W[:, c:] -= ((w - Q[:, c]) / U[c, c])[:, None] * U[c, c:]
        if P is not None:
            W[:, c:] += w[:, None] * P[c, c:]
    return Q


@pytest.mark.parametrize("gs", [-1, 16, 12])
@pytest.mark.parametrize("with_p", [False, True])
def test_lazy_batches_reproduce_unblocked(gs, with_p):
    W, H, X = problem(1)
    _, U = factor(H, 0.01)
    P = gptaq_term(0.25 * torch.randn(40, 40, dtype=DT) @ H / 10, U) if with_p else None
    spec = QuantSpec(3, gs, False)
    width = spec.width(40)
    ref = unblocked(W, U, spec, width, P)
    for bs in (1, 4, 5, 16, 128):
        Q, codes = obs_quantize(W[None], U[None], spec.maxq, *dynamic_minmax(spec, width), block_size=bs,
                                P=None if P is None else P[None])
        assert torch.allclose(Q[0], ref, atol=1e-10, rtol=0), bs


@pytest.mark.parametrize("gs", [-1, 16])
def test_block_size_does_not_change_gptq(gs):
    W, H, X = problem(2)
    spec = QuantSpec(2, gs, False)
    dXXt = torch.randn(40, 40, dtype=DT) @ H / 20
    for kw in ({}, {"act_order": True}, {"dXXt": dXXt}, {"grid": "hessian"}):
        ref = solve_gptq(W, H, spec, block_size=128, **kw)
        for bs in (1, 4, 7):
            res = solve_gptq(W, H, spec, block_size=bs, **kw)
            assert torch.equal(res.codes, ref.codes) and torch.allclose(res.scales, ref.scales, rtol=1e-6), (kw, bs)


def sequential_obs(W, Hd, spec, grid):
    """Direct implementation of the sequential OBS rule: quantize column c of the current constrained optimum
    v_F = w_F - H_FF^-1 H_FX (q_X - w_X) (X = columns already fixed), groups gridded on v at their first column."""
    n, gs = W.shape[1], spec.width(W.shape[1])
    Q = torch.zeros_like(W)
    one = QuantSpec(spec.bits, -1, spec.sym)
    for c in range(n):
        F, X = slice(c, n), slice(0, c)
        v = W[:, F] - (Q[:, X] - W[:, X]) @ torch.linalg.solve(Hd[F, F], Hd[F, X]).T
        if c % gs == 0:
            s, z = (t[:, 0] for t in find_grid(v[:, :gs], one, grid, Hd[c : c + gs, c : c + gs]))
        Q[:, c] = fake_quant(v[:, 0], s, z, spec.maxq)[0]
    return Q


# asymmetric only: a symmetric min-max grid puts the extreme weight exactly on a rounding tie (-maxq/2)
@pytest.mark.parametrize("spec", [QuantSpec(2, -1, False), QuantSpec(3, 16, False), QuantSpec(4, 12, False)])
@pytest.mark.parametrize("grid", ["minmax", "mse", "hessian"])
def test_gptq_is_the_sequential_obs_rule(spec, grid):
    W, H, X = problem(3, rows=8)
    Hd, _ = factor(H, 0.01)
    res = solve_gptq(W, H, spec, grid=grid, block_size=16)
    assert torch.allclose(res.qweight.double(), sequential_obs(W, Hd, spec, grid), atol=1e-5)


def test_tiny_problems_against_brute_force():
    """1 row, 3-4 columns, 2 bits: GPTQ equals the sequential OBS rule and is never below the exhaustive optimum."""
    for seed in range(40):
        n = 3 + seed % 2
        W, H, X = problem(100 + seed, rows=1, n=n, tokens=8)
        spec = QuantSpec(2, -1, False)
        res = solve_gptq(W, H, spec, damp=0.0, grid="minmax")
        Hd, _ = factor(H, 0.0)
        assert torch.allclose(res.qweight.double(), sequential_obs(W, Hd, spec, "minmax"), atol=1e-6)
        codes = torch.tensor(list(itertools.product(range(4), repeat=n)), dtype=torch.int32)  # every code vector
        Qs = (codes - res.zeros[0, 0]).float() * res.scales[0, 0]  # float32, like qweight
        best = min(layer_loss(W, q[None], H) for q in Qs)
        assert best <= layer_loss(W, res.qweight, H) + 1e-12


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("gs", [-1, 16])
def test_gptq_beats_rtn(bits, gs):
    spec = QuantSpec(bits, gs, False)
    for seed in range(4):
        W, H, X = problem(10 + seed)
        rtn = layer_loss(W, solve_rtn(W, spec, grid="mse").qweight, H)
        for kw in ({}, {"act_order": True}, {"static_groups": True}):
            assert layer_loss(W, solve_gptq(W, H, spec, **kw).qweight, H) < rtn, (seed, kw)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [-1, 16, 32])
@pytest.mark.parametrize("sym", [False, True])
def test_result_contract(bits, gs, sym):
    W, H, X = problem(bits + gs)
    spec = QuantSpec(bits, gs, sym)
    for kw in ({}, {"act_order": True}, {"static_groups": True}):
        check_result(solve_gptq(W, H, spec, **kw), W, spec)


def test_act_order_keeps_groups_in_original_order():
    W, H, X = problem(5)
    spec = QuantSpec(3, 16, False)
    res = solve_gptq(W, H, spec, act_order=True)
    S, Z = find_grid(W, spec, "mse")  # static groups: gridded up front on the original columns
    assert torch.allclose(res.scales, S.float()) and torch.equal(res.zeros, Z.int())


def test_gptaq_term_reduces_asymmetric_loss():
    """Quantized-model input X, float-model input Xf = X + (B X + noise): the GPTAQ term lowers ||Q X - W Xf||^2."""
    for seed in range(4):
        W, H, X = problem(20 + seed, tokens=400)
        g = torch.Generator().manual_seed(seed)
        Xf = X + 0.1 * torch.randn(40, 40, generator=g, dtype=DT) @ X + 0.1 * torch.randn(X.shape, generator=g, dtype=DT)
        dXXt = (Xf - X) @ X.T / X.shape[1]
        loss = lambda r: float(((r.qweight.double() @ X - W @ Xf) ** 2).sum())
        for spec in (QuantSpec(3, -1, False), QuantSpec(3, 16, False)):
            assert loss(solve_gptq(W, H, spec, dXXt=dXXt)) < 0.9 * loss(solve_gptq(W, H, spec)), seed


def test_dead_columns():
    W, H, X = problem(6)
    H[3], H[:, 3] = 0, 0
    res = solve_gptq(W, H, QuantSpec(4, 16, False), act_order=True)
    assert (res.qweight[:, 3] == 0).all() and torch.isfinite(res.qweight).all()


def test_damping_escalation_and_failure():
    H = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.02], dtype=DT))
    Hd, U = factor(H, 0.01)  # 1% of mean(diag) = 0.00745 per step: positive definite after 3 steps
    assert Hd[3, 3] > 0 and torch.allclose(U.T @ U, torch.linalg.inv(Hd))
    with pytest.raises(OnnxqError, match="damp"):
        factor(torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=DT)), 0.01)
    with pytest.raises(OnnxqError):
        solve_gptq(torch.randn(4, 3), torch.diag(torch.tensor([1.0, 1.0, -1.0])), QuantSpec(4, -1, False))


def test_float32_default():
    W, H, X = problem(7)
    res = solve_gptq(W.float(), H.float(), QuantSpec(4, 16, False))
    ref = solve_gptq(W, H, QuantSpec(4, 16, False))
    assert res.qweight.dtype == torch.float32
    assert (res.codes != ref.codes).float().mean() < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_follows_input():
    W, H, X = problem(8)
    res = solve_gptq(W.float().cuda(), H.float().cuda(), QuantSpec(4, 16, False), dXXt=H.float().cuda() * 0.01)
    assert res.qweight.is_cuda and res.codes.is_cuda


@pytest.mark.parametrize("solver", ["gptq-act-order", "gptq", "rtn-mse"])
def test_row_pieces_give_the_codes_of_one_solve(solver):
    from onnxq.solve.dispatch import by_row_pieces

    torch.manual_seed(3)
    W, X = torch.randn(23, 64), torch.randn(256, 64)
    H, spec = X.T @ X / 256, QuantSpec(4, 16, False)
    solve = {"gptq-act-order": lambda w: solve_gptq(w, H, spec, act_order=True, static_groups=True, grid="mse"),
             "gptq": lambda w: solve_gptq(w, H, spec),
             "rtn-mse": lambda w: solve_rtn(w, spec, grid="mse")}[solver]
    whole, pieces = solve(W), by_row_pieces(solve, W, rows=5)  # 5 + 5 + 5 + 5 + 3 rows
    for f in ("qweight", "codes", "scales", "zeros"):
        assert torch.equal(getattr(whole, f), getattr(pieces, f)), f
    assert pieces.codes.shape == (23, 64)


def test_layer_loss_in_row_pieces_equals_the_direct_trace(monkeypatch):
    import onnxq.solvers.hessian as hessian

    W, H, _ = problem(7, rows=23)
    Q = W + 0.01 * torch.randn(W.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    direct = float(torch.trace((Q - W) @ H @ (Q - W).T))
    monkeypatch.setattr(hessian, "LOSS_ROWS", 5)
    assert layer_loss(W, Q, H) == pytest.approx(direct, rel=1e-12)
