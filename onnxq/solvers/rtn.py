"""Round-to-nearest on a min-max, MSE or Hessian-weighted grid."""
from __future__ import annotations

from torch import Tensor

from .grid import QuantResult, QuantSpec, fake_quant, find_grid, group_index, make_result
from .hessian import as_work


def solve_rtn(W: Tensor, spec: QuantSpec, *, grid: str = "minmax", H: Tensor | None = None) -> QuantResult:
    """Round W [d_out, d_in] to its group grid; grid 'hessian' needs H [d_in, d_in]."""
    W, H = as_work(W, H)
    S, Z = find_grid(W, spec, grid, H)
    g = group_index(W.shape[-1], spec, W.device)
    return make_result(fake_quant(W, S[:, g], Z[:, g], spec.maxq)[1], S, Z, spec)
