"""Coordinate descent on the codes: descent, coordinate-wise optimality (brute force), closed form for diagonal H."""
import itertools

import pytest
import torch

from onnxq.solvers import QuantSpec, layer_loss, refine_codes, solve_gptq, solve_rtn, solve_turboboa
from onnxq.solvers.grid import make_result
from tests.problems import asym_objective, descends, problem

DT = torch.float64


def kron_objective(W, res, H, Ho, heads, dXXt=None, alpha=0.25):
    """tr(H_out dW H dW^T) - 2 tr(H_out W alpha dXX^T dW^T), summed over heads."""
    D = (res.qweight.double() - W).reshape(heads, -1, W.shape[-1])
    loss = layer_loss(W, res.qweight, H, Ho, heads)
    if dXXt is None:
        return loss
    return loss - 2 * float(((Ho @ (W.reshape(heads, -1, W.shape[-1]) @ (alpha * dXXt))) * D).sum())


@pytest.mark.parametrize("spec", [QuantSpec(3, -1, False), QuantSpec(2, 16, False), QuantSpec(2, 12, False, float_zero=True),
                                  QuantSpec(4, 8, True)])
@pytest.mark.parametrize("with_dx", [False, True])
def test_every_sweep_never_increases_the_objective(spec, with_dx):
    for seed in range(3):
        W, H, X = problem(60 + seed, n=40)
        dXXt = torch.randn(40, 40, dtype=DT) @ H / 20 if with_dx else None
        start = solve_gptq(W, H, spec, dXXt=dXXt, static_groups=True)
        runs = [refine_codes(W, H, start, dXXt=dXXt, sweeps=k) for k in range(4)]
        assert descends([asym_objective(W, r, H, dXXt) for r in runs])
        assert all(torch.equal(r.scales, start.scales) and torch.equal(r.zeros, start.zeros) for r in runs)
        assert all(int(r.codes.min()) >= 0 and int(r.codes.max()) <= spec.maxq for r in runs)


def test_converged_codes_are_coordinatewise_optimal_by_brute_force():
    """After enough sweeps no single code change (every row, column and level) lowers the objective."""
    W, H, X = problem(64, rows=4, n=12)
    dXXt = torch.randn(12, 12, dtype=DT) @ H / 20
    spec = QuantSpec(2, 4, False)
    res = refine_codes(W, H, solve_rtn(W, spec), dXXt=dXXt, sweeps=30)
    base = asym_objective(W, res, H, dXXt)
    for i, j, c in itertools.product(range(4), range(12), range(spec.maxq + 1)):
        codes = res.codes.clone()
        codes[i, j] = c
        other = make_result(codes, res.scales, res.zeros, spec)
        assert asym_objective(W, other, H, dXXt) >= base - 1e-9 * abs(base)


def test_diagonal_hessian_gives_the_exhaustive_optimum_in_one_sweep():
    """With a diagonal H rows and columns decouple: one sweep from any start reaches the best codes on the grid."""
    W, H, X = problem(65, rows=3, n=6)
    H = torch.diag(H.diagonal())
    spec = QuantSpec(2, 3, False)
    start = solve_rtn(W, spec)
    scrambled = make_result(torch.randint(0, 4, W.shape, dtype=torch.int32), start.scales, start.zeros, spec)
    res = refine_codes(W, H, scrambled)
    best = min(
        (make_result(torch.tensor(c, dtype=torch.int32).reshape(1, 6), start.scales[:1], start.zeros[:1], spec)
         for c in itertools.product(range(4), repeat=6)),
        key=lambda r: layer_loss(W[:1], r.qweight, H),
    )
    assert torch.equal(res.codes[0], best.codes[0])


@pytest.mark.parametrize("with_dx", [False, True])
def test_kronecker_and_per_head_hessians_descend(with_dx):
    W, H, X = problem(66, rows=16, n=32)
    dXXt = torch.randn(32, 32, dtype=DT) @ H / 20 if with_dx else None
    A = torch.randn(2, 8, 8, dtype=DT) + 1.0
    Ho = A @ A.mT + torch.eye(8, dtype=DT)
    spec = QuantSpec(3, 16, False)
    start = solve_turboboa(W, H, Ho, spec, n_heads=2, rows_per_block=4, dXXt=dXXt)
    assert descends([kron_objective(W, refine_codes(W, H, start, dXXt=dXXt, H_out=Ho, n_heads=2, sweeps=k), H, Ho, 2, dXXt)
                     for k in range(4)])
    Hh = torch.stack([H, H + torch.diag(H.diagonal())])
    per_head = lambda r: sum(layer_loss(W[8 * h : 8 * h + 8], r.qweight[8 * h : 8 * h + 8], Hh[h]) for h in range(2))
    losses = [per_head(refine_codes(W, Hh, start, n_heads=2, sweeps=k)) for k in range(3)]
    assert losses[2] <= losses[1] < losses[0]


def test_dead_output_row_keeps_its_codes():
    """A row with H_out[i, i] = 0 has no curvature: its codes stay, the others still descend, all in range."""
    W, H, X = problem(70, rows=8, n=24)
    Ho = torch.eye(4, dtype=DT).repeat(2, 1, 1)
    Ho[1, 2, 2] = 0.0
    spec = QuantSpec(2, 8, False)
    start = solve_gptq(W, H, spec, static_groups=True)
    res = refine_codes(W, H, start, H_out=Ho, n_heads=2, sweeps=2)
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= spec.maxq
    assert torch.equal(res.codes[6], start.codes[6])  # head 1, row 2
    assert layer_loss(W, res.qweight, H, Ho, 2) <= layer_loss(W, start.qweight, H, Ho, 2) + 1e-9


def _one_code_at_a_time(W, H, res, Ho, heads, sweeps, maxq):
    """The coupled-row descent written plainly: every code in order, each to the grid point nearest its 1-D optimum
    of tr(Ho dW H dWᵀ) with all other codes fixed (the reference for refine_codes' jump-ahead sweep)."""
    C = res.codes.clone().to(DT).reshape(heads, -1, W.shape[1])
    S, Z = (x.to(DT).repeat_interleave(W.shape[1] // x.shape[1], 1).reshape(heads, -1, W.shape[1]) for x in (res.scales, res.zeros))
    Wh = W.reshape(heads, -1, W.shape[1])
    for _ in range(sweeps):
        for h, i, j in itertools.product(range(heads), range(C.shape[1]), range(W.shape[1])):
            D = (C[h] - Z[h]) * S[h] - Wh[h]
            grad = float((Ho[h] @ D @ H)[i, j])  # dL/dQ[i, j] / 2
            curv = float(Ho[h, i, i] * H[j, j])
            if curv > 0 and S[h, i, j] > 0:
                C[h, i, j] = torch.clamp(torch.round(C[h, i, j] - grad / (curv * S[h, i, j])), 0, maxq)
    return C.reshape(res.codes.shape).to(res.codes.dtype)


def test_coupled_rows_sweep_matches_one_code_at_a_time():
    """The H_out path skips ahead to each head's next moving column: it must take exactly the plain descent's steps."""
    W, H, X = problem(71, rows=12, n=16)
    A = torch.randn(3, 4, 4, dtype=DT)
    Ho = A @ A.mT + 0.5 * torch.eye(4, dtype=DT)
    spec = QuantSpec(2, 8, False)
    start = solve_rtn(W, spec)
    res = refine_codes(W, H, start, H_out=Ho, n_heads=3, sweeps=2)
    assert not torch.equal(res.codes, start.codes)
    assert torch.equal(res.codes, _one_code_at_a_time(W, H, start, Ho, 3, 2, spec.maxq))
