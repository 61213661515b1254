"""Attention statistics against explicit loops: Q/K covariances with GQA, de-rotation, attention-weighted V Hessians."""
from __future__ import annotations

import numpy as np
import torch

from onnxq.analysis.attention import AttentionBlock
from onnxq.calibrate.attention_stats import AttentionStats
from onnxq.solvers import derotate_average


def _block(n_heads=4, n_kv=2, d=8, rope=True) -> AttentionBlock:
    return AttentionBlock(
        block=0, kind="unfused", q="q", k="k", v="v", o="o", fused_qkv=None, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=d, causal=True, rope="rotate_half" if rope else None, q_tensor="Q", k_tensor="K", probs="P",
        v_input="X", cos="cos" if rope else None, sin="sin" if rope else None,
    )


def _capture(rng, B=2, H=4, n_kv=2, T=6, d=8, dm=5):
    kv = rng.standard_normal((B, n_kv, d, T)).astype(np.float32)
    logits = rng.standard_normal((B, H, T, T))
    logits = np.where(np.tril(np.ones((T, T))) > 0, logits, -np.inf)
    P = np.exp(logits - logits.max(-1, keepdims=True))
    ang = np.arange(T)[:, None] * (1.0 / 100 ** (np.arange(d // 2) / (d // 2)))[None]
    ang = np.concatenate([ang, ang], -1)
    return {
        "Q": rng.standard_normal((B, H, T, d)).astype(np.float32),
        "K": np.repeat(kv, H // n_kv, axis=1),  # keys expanded to query heads, transposed [B, H, d, T]
        "P": (P / P.sum(-1, keepdims=True)).astype(np.float32),
        "X": rng.standard_normal((B, T, dm)).astype(np.float32),
        "cos": np.cos(ang)[None, None].astype(np.float32),
        "sin": np.sin(ang)[None, None].astype(np.float32),
    }


def test_row_hessians_match_loops():
    rng = np.random.default_rng(0)
    cap = _capture(rng)
    acc = AttentionStats(_block(), block_v=False)
    acc.add(cap)
    h_q, h_k = acc.row_hessians()
    Q, K = torch.tensor(cap["Q"], dtype=torch.float64), torch.tensor(cap["K"], dtype=torch.float64)
    cos, sin = torch.tensor(cap["cos"][0, 0], dtype=torch.float64), torch.tensor(cap["sin"][0, 0], dtype=torch.float64)
    rows = Q.shape[0] * Q.shape[2]
    ck = torch.stack([sum(K[b, 2 * g, :, t, None] @ K[b, 2 * g, None, :, t] for b in range(2) for t in range(6)) for g in range(2)]) / rows
    cq = torch.stack([sum(Q[b, h, t, :, None] @ Q[b, h, None, t] for b in range(2) for t in range(6)) for h in range(4)]) / rows
    want_q = derotate_average(ck, cos, sin).repeat_interleave(2, 0)
    want_k = derotate_average(cq, cos, sin).reshape(2, 2, 8, 8).mean(1)
    torch.testing.assert_close(h_q.double(), want_q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h_k.double(), want_k, rtol=1e-4, atol=1e-5)


def test_value_hessian_matches_loops_and_stride():
    rng = np.random.default_rng(1)
    cap, cap_fp = _capture(rng), _capture(rng)
    for stride in (1, 2):
        acc = AttentionStats(_block(), residual=True, query_stride=stride)
        acc.add(cap, cap_fp)
        hv, dv = acc.value_hessian()
        P, X = torch.tensor(cap["P"], dtype=torch.float64), torch.tensor(cap["X"], dtype=torch.float64)
        Pf, Xf = torch.tensor(cap_fp["P"], dtype=torch.float64), torch.tensor(cap_fp["X"], dtype=torch.float64)
        ts = range(stride - 1, 6, stride)
        n = 2 * len(ts)
        per_head = [sum(torch.outer(P[b, h, t] @ X[b], P[b, h, t] @ X[b]) for b in range(2) for t in ts) * 2 / n for h in range(4)]
        res = [sum(torch.outer(Pf[b, h, t] @ Xf[b] - P[b, h, t] @ X[b], P[b, h, t] @ X[b]) for b in range(2) for t in ts) * 2 / n for h in range(4)]
        torch.testing.assert_close(hv.double(), torch.stack(per_head).reshape(2, 2, 5, 5).mean(1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dv.double(), torch.stack(res).reshape(2, 2, 5, 5).mean(1), rtol=1e-4, atol=1e-5)


def test_value_row_hessian_is_the_attention_output_loss():
    """tr(H_out ΔV H_in ΔVᵀ) with H_out = W_O,hᵀW_O,h equals Σ_h ||W_O,h ΔV_h Y_h||² (one query head per KV head);
    with GQA the factor is the mean over the query heads of a group."""
    from onnxq.solvers import layer_loss, value_row_hessian

    g = torch.Generator().manual_seed(0)
    H, d, dm, n, T = 3, 4, 10, 6, 9
    W_O = torch.randn(dm, H * d, generator=g, dtype=torch.float64)
    dV = torch.randn(H * d, n, generator=g, dtype=torch.float64)
    Y = torch.randn(H, n, T, generator=g, dtype=torch.float64)  # per-head attention-weighted V inputs
    H_in = Y @ Y.mT
    direct = sum(float((W_O[:, h * d:(h + 1) * d] @ dV[h * d:(h + 1) * d] @ Y[h]).pow(2).sum()) for h in range(H))
    Ho = value_row_hessian(W_O, H, H)
    assert abs(layer_loss(torch.zeros_like(dV), dV, H_in, Ho, n_heads=H) - direct) < 1e-9 * direct
    W6 = torch.randn(dm, 6 * d, generator=g, dtype=torch.float64)
    Ho = value_row_hessian(W6, 6, 2)
    for kv in range(2):
        ref = sum(W6[:, h * d:(h + 1) * d].T @ W6[:, h * d:(h + 1) * d] for h in range(kv * 3, kv * 3 + 3)) / 3
        assert torch.allclose(Ho[kv], ref)
