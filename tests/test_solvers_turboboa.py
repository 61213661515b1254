"""TurboBoA: row-block compensation, the N=1 == BoA reduction, the V/O/MLP path, F2 and F3."""
import pytest
import torch

from onnxq.solvers import QuantSpec, layer_loss, refine_group_scales, solve_boa, solve_gptq, solve_turboboa
from onnxq.solvers.hessian import factor
from onnxq.solvers.turboboa import row_gain
from tests.problems import attn_problem, check_result, float_grid_weight

DT = torch.float64


def test_row_gain_is_the_constrained_optimum():
    _, _, Ho = attn_problem(0, d=12)
    Hd, U = factor(Ho, 0.01)
    for r1, r2 in ((0, 1), (0, 4), (3, 7), (8, 11)):
        B, R = slice(r1, r2), slice(r2, 12)
        direct = -torch.linalg.solve(Hd[:, R, R], Hd[:, R, B])  # dW_R = -H_RR^-1 H_RB dW_B
        assert torch.allclose(row_gain(U, r1, r2), direct, atol=1e-10)


@pytest.mark.parametrize("spec", [QuantSpec(2, -1, False), QuantSpec(3, 16, False), QuantSpec(4, 12, True)])
@pytest.mark.parametrize("act_order", [False, True])
def test_one_row_blocks_reproduce_boa(spec, act_order):
    W, Hi, Ho = attn_problem(1, n=40)
    boa = solve_boa(W, Hi, Ho, spec, n_heads=4, act_order=act_order)
    turbo = solve_turboboa(W, Hi, Ho, spec, n_heads=4, rows_per_block=1, refine=False, act_order=act_order)
    assert torch.equal(turbo.codes, boa.codes) and torch.equal(turbo.scales, boa.scales)
    assert torch.equal(turbo.qweight, boa.qweight)


def test_turboboa_beats_gptq_with_non_identity_h_out():
    for seed in range(4):
        W, Hi, Ho = attn_problem(10 + seed)
        for spec in (QuantSpec(2, -1, False), QuantSpec(3, 16, False)):
            gptq = min(layer_loss(W, solve_gptq(W, Hi, spec, grid=g).qweight, Hi, Ho, 4) for g in ("mse", "hessian"))
            for kw in ({"refine": False}, {}, {"act_order": True}):
                turbo = solve_turboboa(W, Hi, Ho, spec, n_heads=4, rows_per_block=2, **kw)
                assert layer_loss(W, turbo.qweight, Hi, Ho, 4) < 0.9 * gptq, (seed, spec, kw)


def test_single_block_with_identity_h_out_is_gptq():
    W, Hi, _ = attn_problem(2)
    Ho = torch.eye(8, dtype=DT).expand(4, 8, 8)
    spec = QuantSpec(3, 16, False)
    turbo = solve_turboboa(W, Hi, Ho, spec, n_heads=4, rows_per_block=8, refine=False)
    assert torch.equal(turbo.codes, solve_gptq(W, Hi, spec, grid="hessian", static_groups=True).codes)


def test_no_h_out_path_is_gptq():
    """V/O/MLP: shared H_in is GPTQ with static Hessian grids (+ GPTAQ term); per-head H_in (block_v) is GPTQ per head."""
    W, Hi, _ = attn_problem(3)
    spec, dXXt = QuantSpec(3, 16, False), torch.randn(32, 32, dtype=DT) @ Hi / 20
    for R in (None, dXXt):
        turbo = solve_turboboa(W, Hi, None, spec, n_heads=4, refine=False, dXXt=R)
        assert torch.equal(turbo.codes, solve_gptq(W, Hi, spec, grid="hessian", static_groups=True, dXXt=R).codes)
    Hh = torch.stack([Hi + 0.3 * h * torch.diag(Hi.diagonal()) for h in range(4)])
    turbo = solve_turboboa(W, Hh, None, spec, n_heads=4, refine=False)
    heads = [solve_gptq(W[8 * h : 8 * h + 8], Hh[h], spec, grid="hessian", static_groups=True) for h in range(4)]
    assert torch.equal(turbo.codes, torch.cat([r.codes for r in heads]))
    refined = solve_turboboa(W, Hh, None, spec, n_heads=4)
    per_head = lambda r: sum(layer_loss(W[8 * h : 8 * h + 8], r.qweight[8 * h : 8 * h + 8], Hh[h]) for h in range(4))
    assert per_head(refined) <= per_head(turbo) * (1 + 1e-7)


def objective(W, res, Hi, Ho, n_heads, dXXt=None, alpha=0.25):
    """L = tr(H_out dW H_in dW^T) - 2 tr(H_out W alpha dXX^T dW^T), summed over heads."""
    L = layer_loss(W, res.qweight, Hi, Ho, n_heads)
    if dXXt is not None:
        D = (res.qweight.double() - W).reshape(n_heads, -1, W.shape[1])
        Wh = W.reshape(n_heads, -1, W.shape[1])
        L -= 2 * float(((Ho @ Wh @ (alpha * dXXt)) * D).sum())
    return L


def test_f2_term_lowers_the_asymmetric_objective():
    """Float input Xf = X + (B X + noise): the F2 term lowers tr(H_out E E^T), E = Q X - W Xf, on average."""
    ratios = []
    for seed in range(4):
        W, _, Ho = attn_problem(20 + seed)
        g = torch.Generator().manual_seed(seed)
        X = (torch.randn(32, 32, generator=g, dtype=DT) * 0.5 + torch.eye(32, dtype=DT)) @ torch.randn(32, 300, generator=g, dtype=DT)
        Xf = X + 0.1 * torch.randn(32, 32, generator=g, dtype=DT) @ X + 0.1 * torch.randn(X.shape, generator=g, dtype=DT)
        Hi, dXXt = X @ X.T / 300, (Xf - X) @ X.T / 300

        def loss(r):
            E = (r.qweight.double() @ X - W @ Xf).reshape(4, 8, -1)
            return float((Ho * (E @ E.mT)).sum())

        spec = QuantSpec(3, -1, False)
        ratios.append(loss(solve_turboboa(W, Hi, Ho, spec, n_heads=4, rows_per_block=2, dXXt=dXXt))
                      / loss(solve_turboboa(W, Hi, Ho, spec, n_heads=4, rows_per_block=2)))
    assert sum(ratios) / len(ratios) < 0.9 and max(ratios) < 1.0


@pytest.mark.parametrize("gs", [-1, 16])
@pytest.mark.parametrize("with_dx", [False, True])
def test_cd_sweeps_never_increase_their_objective(gs, with_dx):
    W, Hi, Ho = attn_problem(4, n=40)
    dXXt = torch.randn(40, 40, dtype=DT) @ Hi / 20 if with_dx else None
    res = solve_turboboa(W, Hi, Ho, QuantSpec(2, gs, False), n_heads=4, rows_per_block=4, refine=False, dXXt=dXXt)
    losses = [objective(W, refine_group_scales(W, Hi, res, dXXt=dXXt, H_out=Ho, n_heads=4, sweeps=k), Hi, Ho, 4, dXXt)
              for k in range(5)]
    assert all(b <= a + 1e-7 * abs(a) for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0]


@pytest.mark.parametrize("spec", [QuantSpec(2, -1, False), QuantSpec(4, 12, True), QuantSpec(3, 16, False)])
def test_turboboa_contract(spec):
    W, Hi, Ho = attn_problem(6, n=40)
    for kw in ({}, {"act_order": True}, {"rows_per_block": 3, "dXXt": Hi * 0.01}):
        check_result(solve_turboboa(W, Hi, Ho, spec, n_heads=4, **kw), W, spec)
        check_result(solve_turboboa(W, Hi, None, spec, n_heads=4, **kw), W, spec)


@pytest.mark.parametrize("act_order", [False, True])
def test_float_zero_solvers_keep_a_weight_already_on_its_grid(act_order):
    """A weight on per-group offset grids (0 not on them): with float zeros GPTQ, BoA and TurboBoA (F3 on; F2 off, as
    it moves the target) keep it, loss ~0; with integer zeros they cannot."""
    _, Hi, Ho = attn_problem(3, n=40)
    W = float_grid_weight(rows=32, n=40, gs=16, bits=3, seed=1)
    f, i = QuantSpec(3, 16, False, float_zero=True), QuantSpec(3, 16, False)
    runs = {
        "gptq": lambda s: solve_gptq(W, Hi, s, act_order=act_order, static_groups=True, grid="hessian"),
        "boa": lambda s: solve_boa(W, Hi, Ho, s, n_heads=4, act_order=act_order),
        "turboboa": lambda s: solve_turboboa(W, Hi, Ho, s, n_heads=4, rows_per_block=4, act_order=act_order),
    }
    for name, run in runs.items():
        exact, integer = run(f), run(i)
        assert exact.zeros.is_floating_point(), name
        assert layer_loss(W, exact.qweight, Hi) < 1e-8 * layer_loss(W, integer.qweight, Hi), name


def test_target_is_what_each_row_block_was_solved_against():
    """with_target: under H_out = I no row is compensated (the target is W); under a dense H_out the first row block
    of each head keeps W and the later rows move."""
    g = torch.Generator().manual_seed(1)
    d, n, heads = 8, 24, 2
    W = torch.randn(heads * d, n, generator=g, dtype=torch.float64)
    X = torch.randn(200, n, generator=g, dtype=torch.float64)
    A = torch.randn(heads, d, d, generator=g, dtype=torch.float64)
    spec = QuantSpec(bits=3, group_size=8, sym=False)
    _, same = solve_turboboa(W, X.T @ X, torch.eye(d, dtype=torch.float64).repeat(heads, 1, 1), spec, n_heads=heads,
                             rows_per_block=4, refine=False, with_target=True)
    assert torch.allclose(same, W, atol=1e-12)
    _, target = solve_turboboa(W, X.T @ X, A @ A.mT + torch.eye(d), spec, n_heads=heads, rows_per_block=4,
                                 refine=False, act_order=False, with_target=True)
    rows = lambda t: t.reshape(heads, d, n)  # noqa: E731
    assert torch.allclose(rows(target)[:, :4], rows(W)[:, :4]) and not torch.allclose(rows(target)[:, 4:], rows(W)[:, 4:])
