"""Uniform quantizer, result types and grid (scale / zero) searches: min-max, GPTQ MSE, Hessian-weighted (spec §1.1-1.2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from onnxq.errors import OnnxqError

GRIDS = ("minmax", "mse", "hessian")


@dataclass
class QuantSpec:
    """Bit width, group size along d_in (-1 = per output channel), symmetric / asymmetric grid, and whether the
    asymmetric zero point is a float (MatMulNBits' float zero_points: the grid spans [min, max] exactly)."""

    bits: int
    group_size: int
    sym: bool
    float_zero: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8 or self.group_size == 0 or self.group_size < -1:
            raise OnnxqError(f"invalid quantization spec bits={self.bits} group_size={self.group_size}: use 1-8 bits, group size -1 or >= 1")
        if self.float_zero and self.sym:
            raise OnnxqError("float zero points need an asymmetric grid: drop --sym or use integer zero points")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def width(self, n: int) -> int:
        """Columns per group for a weight with n columns."""
        return n if self.group_size == -1 else min(self.group_size, n)


@dataclass
class QuantResult:
    """A quantized weight: qweight == (codes - zeros[:, g]) * scales[:, g] in float32, g = column // group_size."""

    qweight: Tensor  # [d_out, d_in] float32
    codes: Tensor  # [d_out, d_in] int32 in [0, 2^bits - 1]
    scales: Tensor  # [d_out, n_groups] float32
    zeros: Tensor  # [d_out, n_groups] int32 (float32 for float zero points)
    bits: int
    group_size: int
    sym: bool
    bias: Tensor | None = None  # [d_out] float32 output bias (mean correction), added after the MatMul

    @property
    def spec(self) -> QuantSpec:
        """The grid this result was quantized on (float zero points where the zeros are floats)."""
        return QuantSpec(self.bits, self.group_size, self.sym, self.zeros.is_floating_point())


def group_index(n: int, spec: QuantSpec, device: torch.device | None = None) -> Tensor:
    """Group of every column: [n] long."""
    return torch.arange(n, device=device) // spec.width(n)


def make_result(codes: Tensor, scales: Tensor, zeros: Tensor, spec: QuantSpec) -> QuantResult:
    """Pack codes [r, n] and group grids [r, G] into a QuantResult, qweight recomputed in float32."""
    codes, scales = codes.to(torch.int32), scales.float()
    zeros = zeros.float() if spec.float_zero else zeros.round().to(torch.int32)
    g = group_index(codes.shape[-1], spec, codes.device)
    qweight = (codes - zeros[:, g]).float() * scales[:, g]
    return QuantResult(qweight, codes, scales, zeros, spec.bits, spec.group_size, spec.sym)


def fake_quant(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """q = s * (clamp(round(w/s + z), 0, maxq) - z); returns (q, codes as float).

    The zero's integer part is added after rounding, so integer zeros give exactly clamp(round(w/s) + z)."""
    zero = torch.as_tensor(zero, dtype=w.dtype, device=w.device)
    whole = torch.round(zero)
    code = torch.clamp(torch.round(w / scale + (zero - whole)) + whole, 0, maxq)
    return scale * (code - zero), code


def quant_error(w: Tensor, scale: Tensor, zero: Tensor, maxq: int, out: Tensor | None = None) -> Tensor:
    """fake_quant(w, scale, zero, maxq)[0] - w, the same operations in place (the grid searches' inner loop), into
    `out` if given (a reused buffer: fresh multi-MB temporaries per candidate fragment the heap by hundreds of MB)."""
    whole = torch.round(zero)
    code = torch.div(w, scale, out=out)
    return code.add_(zero - whole).round_().add_(whole).clamp_(0, maxq).sub_(zero).mul_(scale).sub_(w)


def _grouped(W: Tensor, gs: int) -> Tensor:
    """[..., r, n] -> [..., r, G, gs], zero-padded (zeros never move min/max and quantize to 0)."""
    n = W.shape[-1]
    return F.pad(W, (0, -n % gs)).unflatten(-1, (-1, gs))


def _hessian_blocks(H: Tensor, gs: int) -> Tensor:
    """Diagonal gs x gs blocks of H [..., n, n] -> [..., G, gs, gs], zero-padded."""
    m = -H.shape[-1] % gs
    Hp = F.pad(H, (0, m, 0, m)).unflatten(-1, (-1, gs)).unflatten(-3, (-1, gs))  # [..., G, gs, G, gs]
    return Hp.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)


def _valid(n: int, gs: int, device: torch.device) -> Tensor:
    """[G, gs] mask of the real (not padding) columns of `_grouped`."""
    return (torch.arange(-(-n // gs) * gs, device=device) < n).view(-1, gs)


def _ranges(Wg: Tensor, spec: QuantSpec, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per (row, group) range: [min, max] of the real columns for float zeros (constant groups widened to [c, c+1]),
    else the range widened to contain 0; symmetric ranges are [-max|w|, max|w|]; all-zero groups get [-1, 1]."""
    if spec.float_zero:
        lo = Wg.masked_fill(~valid, float("inf")).amin(-1)
        hi = Wg.masked_fill(~valid, float("-inf")).amax(-1)
        return lo, torch.where(hi > lo, hi, lo + 1)
    lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)
    if spec.sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    dead = (lo == 0) & (hi == 0)
    return lo.masked_fill(dead, -1.0), hi.masked_fill(dead, 1.0)


def _candidate(lo: Tensor, hi: Tensor, p: float | Tensor, spec: QuantSpec, rnd=torch.round) -> tuple[Tensor, Tensor]:
    """Scale and zero for the range shrunk by p (towards 0, or towards its middle for float zeros); the integer zero
    is rounded with `rnd` (asymmetric only)."""
    s = p * (hi - lo) / spec.maxq
    if spec.float_zero:
        return s, -((hi + lo) / 2 - p * (hi - lo) / 2) / s
    z = torch.full_like(s, 2 ** (spec.bits - 1)) if spec.sym else rnd(-p * lo / s)
    return s, z


def _best(Wg: Tensor, valid: Tensor, candidates, score, maxq: int) -> tuple[Tensor, Tensor]:
    """Per (row, group) of Wg, the first (scale, zero) among `candidates` with the lowest score(delta) on real columns
    (score may overwrite delta)."""
    best = S = Z = None
    padding, delta = ~valid, torch.empty_like(Wg)
    for s, z in candidates:
        err = score(quant_error(Wg, s[..., None], z[..., None], maxq, out=delta).masked_fill_(padding, 0))
        if best is None:
            best, S, Z = err, s, z
            continue
        better = err < best
        best, S, Z = torch.where(better, err, best), torch.where(better, s, S), torch.where(better, z, Z)
    return S, Z


def _search(W: Tensor, spec: QuantSpec, cands, score) -> tuple[Tensor, Tensor]:
    """Keep, per (row, group), the first candidate (shrink, zero rounding) with the lowest score(delta)."""
    gs = spec.width(W.shape[-1])
    Wg, valid = _grouped(W, gs), _valid(W.shape[-1], gs, W.device)
    lo, hi = _ranges(Wg, spec, valid)
    return _best(Wg, valid, (_candidate(lo, hi, p, spec, rnd) for p, rnd in cands), score, spec.maxq)


def minmax_grid(W: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Min-max grid of W [..., r, n]: (scale, zero) [..., r, G]."""
    return _search(W, spec, [(1.0, torch.round)], lambda d: d.new_zeros(d.shape[:-1]))


def mse_grid(W: Tensor, spec: QuantSpec, *, grid: int = 100, maxshrink: float = 0.8, norm: float = 2.4) -> tuple[Tensor, Tensor]:
    """GPTQ's MSE search: shrink p = 1 - i/grid for i < maxshrink*grid, score sum |delta|^norm."""
    cands = [(1 - i / grid, torch.round) for i in range(int(maxshrink * grid))]
    return _search(W, spec, cands, lambda d: d.abs_().pow_(norm).sum(-1))  # d is a temporary


def hessian_weighted_grid(
    W: Tensor, H: Tensor, spec: QuantSpec, *, n_shrink: int = 100, top_k: int | None = None
) -> tuple[Tensor, Tensor]:
    """BoA / gso stage-1 search: p = 1 - k/100 (k < n_shrink), floor and ceil zero, score delta^T H[g,g] delta.

    W [..., r, n], H [..., n, n] (leading dims broadcast with W's); returns (scale, zero) [..., r, G]. With top_k,
    candidates are first ranked by the diagonal score sum H_ii delta_i^2 and only the best top_k get the full score."""
    Hb = _hessian_blocks(H.to(W), spec.width(W.shape[-1]))
    rnds = [None] if spec.sym or spec.float_zero else [torch.floor, torch.ceil]
    cands = [(1 - k / 100, r) for k in range(n_shrink) for r in rnds]
    full = lambda d: torch.einsum("...rgi,...gij->...rgj", d, Hb).mul_(d).sum(-1)  # noqa: E731
    if top_k is None or top_k >= len(cands):
        return _search(W, spec, cands, full)
    diag = Hb.diagonal(dim1=-2, dim2=-1)[..., None, :, :]  # [..., 1, G, gs] broadcast over rows
    gs = spec.width(W.shape[-1])
    Wg, valid = _grouped(W, gs), _valid(W.shape[-1], gs, W.device)
    lo, hi = _ranges(Wg, spec, valid)
    shrinks = [1 - k / 100 for k in range(n_shrink)]
    cheap, delta = Wg.new_empty(len(shrinks), *lo.shape), torch.empty_like(Wg)
    for i, p in enumerate(shrinks):  # rank shrink factors by the diagonal score with a rounded zero point
        s, z = _candidate(lo, hi, p, spec, torch.round)
        torch.sum(quant_error(Wg, s[..., None], z[..., None], spec.maxq, out=delta).square_().mul_(diag), -1, out=cheap[i])
    keep = max(1, top_k // len(rnds))
    idx = cheap.topk(keep, dim=0, largest=False).indices.sort(dim=0).values  # [keep, ..., r, G], candidate order
    p_all = torch.tensor(shrinks, dtype=W.dtype, device=W.device)
    return _best(Wg, valid, (_candidate(lo, hi, p_all[i], spec, rnd) for i in idx for rnd in rnds), full, spec.maxq)


HESSIAN_TOP_K = 48  # candidates that get the full delta^T H delta score inside the solvers (see hessian_weighted_grid)


def find_grid(W: Tensor, spec: QuantSpec, kind: str = "minmax", H: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dispatch on the grid kind: 'minmax', 'mse' (GPTQ) or 'hessian' (needs H)."""
    if kind == "minmax":
        return minmax_grid(W, spec)
    if kind == "mse":
        return mse_grid(W, spec)
    if kind == "hessian":
        if H is None:
            raise OnnxqError("the 'hessian' grid needs a Hessian: use grid 'minmax' or 'mse' for RTN without calibration")
        return hessian_weighted_grid(W, H, spec, top_k=HESSIAN_TOP_K)
    raise OnnxqError(f"unknown grid search {kind!r}: use one of {', '.join(GRIDS)}")
