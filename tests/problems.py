"""Small random solver problems (weights, Hessians, activations; float64) and checks of solver results."""
import torch

from onnxq.solvers import layer_loss

DT = torch.float64


def problem(seed, rows=16, n=40, tokens=256):
    """W and a correlated-input Hessian H = X X^T / tokens, plus X."""
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(n, n, generator=g, dtype=DT) * 0.5 + torch.eye(n, dtype=DT)) @ torch.randn(n, tokens, generator=g, dtype=DT)
    X = X * torch.rand(n, 1, generator=g, dtype=DT) * 2  # uneven channel scales
    return torch.randn(rows, n, generator=g, dtype=DT), X @ X.T / tokens, X


def attn_problem(seed, h=4, d=8, n=32, tokens=300):
    """W [h*d, n], a correlated H_in [n, n] and a strongly non-diagonal per-head H_out [h, d, d]."""
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(n, n, generator=g, dtype=DT) * 0.5 + torch.eye(n, dtype=DT)) @ torch.randn(n, tokens, generator=g, dtype=DT)
    A = torch.randn(h, d, d, generator=g, dtype=DT) + 1.5 * torch.randn(h, 1, d, generator=g, dtype=DT)
    K = torch.randn(h, tokens, d, generator=g, dtype=DT) @ A
    return torch.randn(h * d, n, generator=g, dtype=DT), X @ X.T / tokens, K.mT @ K / tokens


def float_grid_weight(rows=5, n=40, gs=16, bits=3, seed=0):
    """W whose every group sits on its own grid lo + k*s (k over all codes) with lo > 0: zero is not on the grid."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-n // gs)
    lo, s = torch.rand(rows, groups, generator=g, dtype=torch.float64) + 0.1, torch.rand(rows, groups, generator=g, dtype=torch.float64) * 0.1 + 0.01
    k = torch.randint(0, 2**bits, (rows, n), generator=g).double()
    k[:, ::gs], k[:, 1::gs] = 0, 2**bits - 1  # every group reaches both ends of its grid
    cols = torch.arange(n) // gs
    return lo[:, cols] + k * s[:, cols]


def check_result(res, W, spec):
    """The QuantResult contract: shapes, dtypes, code range, sym zeros, qweight == (codes - zeros) * scales in fp32."""
    r, n = W.shape
    G = 1 if spec.group_size == -1 else -(-n // spec.group_size)
    g = torch.arange(n) // (n if spec.group_size == -1 else spec.group_size)
    assert res.qweight.shape == res.codes.shape == (r, n) and res.scales.shape == res.zeros.shape == (r, G)
    assert res.qweight.dtype == res.scales.dtype == torch.float32 and res.codes.dtype == res.zeros.dtype == torch.int32
    assert res.codes.min() >= 0 and res.codes.max() <= spec.maxq
    assert (res.bits, res.group_size, res.sym) == (spec.bits, spec.group_size, spec.sym)
    assert torch.equal(res.qweight, (res.codes - res.zeros[:, g]).float() * res.scales[:, g])
    if spec.sym:
        assert (res.zeros == 2 ** (spec.bits - 1)).all()
    else:
        assert res.zeros.min() >= 0 and res.zeros.max() <= spec.maxq


def descends(losses):
    """Every sweep keeps the objective (up to rounding) and the first one lowers it."""
    return all(b <= a + 1e-9 * abs(a) for a, b in zip(losses, losses[1:])) and losses[1] < losses[0]


def asym_objective(W, res, H, dXXt, alpha=0.25):
    """Layer loss of `res` minus the GPTAQ cross term 2 <W (alpha dXXt), Q - W> (plain layer loss without dXXt)."""
    D = res.qweight.double() - W
    return layer_loss(W, res.qweight, H) - (0 if dXXt is None else 2 * float(((W @ (alpha * dXXt)) * D).sum()))
