"""Size-budgeted mixed precision: one MatMulNBits format per linear layer, least summed Hessian-weighted loss under a
byte budget (a multiple-choice knapsack solved exactly by dynamic programming over bytes)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from ..errors import OnnxqError
from ..formats.rewrite import PER_CHANNEL_BLOCK, _nbits_block
from ..formats.targets import support
from ..graph.io import stored_bytes
from ..solvers import QuantResult, QuantSpec, layer_loss, solve_gptq, solve_rtn

MB = 1e6
DP_STEPS = 200_000  # the budget is cut into at most this many units (sizes round up to whole units)


@dataclass(frozen=True)
class Candidate:
    """One MatMulNBits weight format: bit width and group size along K (-1 = per output channel)."""

    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8) or self.group_size not in (32, 64, 128, -1):
            raise OnnxqError(f"no MatMulNBits candidate with bits={self.bits} group_size={self.group_size}: "
                             "use bits 2/3/4/8 and group 32/64/128 or -1 (per channel)")

    def spec(self, sym: bool, float_zero: bool = False) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, sym, float_zero)

    def __str__(self) -> str:
        return f"w{self.bits}" + ("pc" if self.group_size == -1 else f"g{self.group_size}")


# 3-bit is left out: its codes sit in 4-bit containers, so it costs exactly the bytes of 4-bit and always loses to it;
# per-channel too: from K = 128 up it is written as 128-blocks with the scale repeated, the bytes of g128 and more loss.
CANDIDATES = tuple(Candidate(b, g) for b in (2, 4, 8) for g in (32, 64, 128))


def candidates(*, float_zero: bool = False, target: str | None = None) -> tuple[Candidate, ...]:
    """CANDIDATES that MatMulNBits runs with these zero points (no 8-bit float-zero kernel), on `target` if given."""
    t = None if target is None else support(target)
    widths = {2, 4, 8} if t is None else set(t.float_zero if float_zero else t.nbits)
    widths -= {8} if float_zero else set()
    block_ok = lambda g: t is None or not t.block_sizes or (PER_CHANNEL_BLOCK if g == -1 else g) in t.block_sizes  # noqa: E731
    kept = tuple(c for c in CANDIDATES if (4 if c.bits == 3 else c.bits) in widths and block_ok(c.group_size))
    if not kept:
        zeros = " with float zero points" if float_zero else ""
        raise OnnxqError(f"no MatMulNBits format runs on {target}{zeros}: drop --float-zero or the size budget")
    return kept


def matmulnbits_bytes(k: int, n: int, cand: Candidate, *, sym: bool, float_zero: bool, scale_bytes: int = 4,
                      external: bool = False) -> int:
    """Bytes of the initializers `to_matmulnbits` writes for a [K, N] MatMul: packed B, scales, zero points; with
    `external`, as stored in an external-data file (graph.io.stored_bytes: page-aligned).

    scale_bytes is the weight dtype's width (scales and float zero points are stored in it)."""
    if cand.bits == 8 and float_zero:
        raise OnnxqError("MatMulNBits has no 8-bit kernel with float zero points: use integer zero points at 8 bits")
    block = _nbits_block(cand, k, str(cand))  # reads only bits and group_size
    width = 4 if cand.bits == 3 else cand.bits
    blocks = -(-k // block)
    blob = n * blocks * (block * width // 8)
    scales = n * blocks * scale_bytes
    zeros = 0 if sym else n * blocks * scale_bytes if float_zero else n * -(-blocks * width // 8)
    return sum(stored_bytes(b, external) for b in (blob, scales, zeros) if b)


def candidate_losses(
    W: Tensor, H: Tensor, cands=CANDIDATES, *, solver: str = "gptq", sym: bool = False, float_zero: bool = False,
    damp: float = 0.01,
) -> dict[Candidate, float]:
    """tr(dW H dW^T) that `solver` ('gptq' or 'rtn') reaches on W [d_out, d_in], H [d_in, d_in] for each candidate."""
    if solver not in _SOLVERS:
        raise OnnxqError(f"unknown allocation solver {solver!r}: use one of {', '.join(_SOLVERS)}")
    solve = _SOLVERS[solver]
    return {c: layer_loss(W, solve(W, H, c.spec(sym, float_zero and c.bits < 8), damp).qweight, H) for c in cands}


def _gptq(W: Tensor, H: Tensor, spec: QuantSpec, damp: float) -> QuantResult:
    return solve_gptq(W, H, spec, damp=damp, act_order=True, static_groups=True, grid="minmax")  # 3x faster than mse


def _rtn(W: Tensor, H: Tensor, spec: QuantSpec, damp: float) -> QuantResult:
    return solve_rtn(W, spec, grid="hessian", H=H)


_SOLVERS = {"gptq": _gptq, "rtn": _rtn}


def allocate(losses: list[dict[Candidate, float]], sizes: list[dict[Candidate, int]], budget: int) -> list[Candidate]:
    """One candidate per layer (those in its `losses`), least summed loss with summed `sizes` <= budget bytes."""
    fronts = [_pareto(loss, size) for loss, size in zip(losses, sizes, strict=True)]
    smallest = sum(f[0][1] for f in fronts)
    if smallest > budget:
        raise OnnxqError(f"size budget {budget / MB:.2f} MB is below the smallest choice, {smallest / MB:.2f} MB of "
                         "quantized weights: raise the budget to at least that or add smaller candidates")
    unit = max(1, budget // DP_STEPS)
    units = [np.array([-(-s // unit) for _, s, _ in f], dtype=np.int64) for f in fronts]
    cap = budget // unit - sum(int(u[0]) for u in units)  # room above every layer's smallest choice
    if cap < 0:  # only the rounding up to units overflows: the smallest choice is the one that fits
        return [f[0][0] for f in fronts]
    picks = _knapsack([u - u[0] for u in units], [np.array([x for *_, x in f]) for f in fronts], cap)
    return [f[j][0] for f, j in zip(fronts, picks)]


def _pareto(loss: dict[Candidate, float], size: dict[Candidate, int]) -> list[tuple[Candidate, int, float]]:
    """(candidate, bytes, loss) not dominated by another (no more bytes and no more loss), by bytes ascending."""
    front: list[tuple[Candidate, int, float]] = []
    for c in sorted(loss, key=lambda c: (size[c], loss[c])):
        if not front or loss[c] < front[-1][2]:
            front.append((c, size[c], float(loss[c])))
    return front


def _knapsack(extra: list[np.ndarray], loss: list[np.ndarray], cap: int) -> list[int]:
    """Multiple-choice knapsack: the option index per layer with least summed loss, summed extra units <= cap."""
    best = np.zeros(cap + 1)  # best[c]: least loss of the layers so far within c units
    picks = []
    for e, l in zip(extra, loss):
        new, pick = np.full(cap + 1, np.inf), np.zeros(cap + 1, dtype=np.int8)
        for j in np.flatnonzero(e <= cap):
            reach = best[: cap + 1 - e[j]] + l[j]
            better = reach < new[e[j]:]
            np.putmask(new[e[j]:], better, reach)
            np.putmask(pick[e[j]:], better, j)
        best = new
        picks.append(pick)
    chosen, c = [], cap
    for e, pick in zip(reversed(extra), reversed(picks)):
        chosen.append(int(pick[c]))
        c -= int(e[chosen[-1]])
    return chosen[::-1]


def bpw_budget(bpw: float, shapes: list[tuple[int, int]]) -> int:
    """The byte budget that `bpw` bits per weight gives MatMuls [K, N] (for --bpw)."""
    return int(bpw * sum(k * n for k, n in shapes) / 8)
