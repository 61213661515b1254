"""BoA, RoPE de-rotation and GQA helpers."""
import pytest
import torch

from onnxq.solvers import QuantSpec, derotate_average, gqa_average, gqa_replicate, layer_loss, solve_boa, solve_gptq
from tests.problems import attn_problem, check_result

DT = torch.float64


def rope(x, cos, sin):
    """HF rotate-half RoPE on the last dim."""
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


def test_derotate_average_matches_explicit_rotations():
    d, T = 8, 11
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=DT) / d))
    ang = torch.outer(torch.arange(T, dtype=DT), inv_freq)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    B = torch.randn(3, d, d, dtype=DT)
    C = B @ B.mT
    ref = torch.zeros_like(C)
    for p in range(T):
        R = rope(torch.eye(d, dtype=DT), cos[p], sin[p]).T  # column i = R_p e_i
        ref += R.T @ C @ R / T
    assert torch.allclose(derotate_average(C, cos, sin), ref, atol=1e-12)
    # the score error it models: sum_t (R_t dq)^T C_K (R_t dq) = dq^T (T * mean) dq
    dq = torch.randn(d, dtype=DT)
    direct = sum(rope(dq, cos[p], sin[p]) @ C[0] @ rope(dq, cos[p], sin[p]) for p in range(T)) / T
    assert torch.allclose(dq @ derotate_average(C, cos, sin)[0] @ dq, direct)


def test_gqa_helpers():
    C = torch.arange(6 * 4, dtype=DT).reshape(6, 2, 2)
    avg = gqa_average(C, 2)
    assert torch.allclose(avg[0], C[:3].mean(0)) and torch.allclose(avg[1], C[3:].mean(0))
    rep = gqa_replicate(avg, 6)
    assert torch.equal(rep[1], avg[0]) and torch.equal(rep[4], avg[1])


def test_boa_beats_gptq_with_non_identity_h_out():
    for seed in range(4):
        W, Hi, Ho = attn_problem(seed)
        for spec in (QuantSpec(2, -1, False), QuantSpec(3, 16, False)):
            boa = layer_loss(W, solve_boa(W, Hi, Ho, spec, n_heads=4).qweight, Hi, Ho, 4)
            for grid in ("mse", "hessian"):
                assert boa < 0.8 * layer_loss(W, solve_gptq(W, Hi, spec, grid=grid).qweight, Hi, Ho, 4), (seed, spec)


def test_boa_with_identity_h_out_is_gptq():
    W, Hi, _ = attn_problem(5)
    Ho = torch.eye(8, dtype=DT).expand(4, 8, 8)  # no row coupling: nothing to compensate across rows
    for spec in (QuantSpec(3, -1, False), QuantSpec(2, 16, True)):
        boa = solve_boa(W, Hi, Ho, spec, n_heads=4)
        assert torch.equal(boa.codes, solve_gptq(W, Hi, spec, grid="hessian", static_groups=True).codes)


@pytest.mark.parametrize("spec", [QuantSpec(2, -1, False), QuantSpec(4, 12, True), QuantSpec(3, 16, False)])
def test_boa_contract_and_act_order(spec):
    W, Hi, Ho = attn_problem(6, n=40)
    for act_order in (False, True):
        check_result(solve_boa(W, Hi, Ho, spec, n_heads=4, act_order=act_order), W, spec)
