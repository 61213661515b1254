"""Choose and run the solver for one linear layer from the recipe and the captured statistics."""
from __future__ import annotations

import torch

from .analysis import LinearLayer
from .recipe import QuantRecipe
from .solvers import QuantResult, QuantSpec, layer_loss, refine_group_scales, solve_gptq, solve_rtn
from .stats import Covariance


def solve_layer(
    layer: LinearLayer, W: torch.Tensor, stats: dict[str, Covariance] | None, recipe: QuantRecipe
) -> tuple[QuantResult, float]:
    """Quantize W[d_out, d_in] of `layer`; returns the result and its layer loss tr(ΔW H ΔWᵀ) (nan without H)."""
    spec = QuantSpec(bits=recipe.bits, group_size=recipe.group_size, sym=recipe.sym)
    cov = stats.get(layer.input) if stats else None
    if cov is None:
        res = solve_rtn(W, spec, grid="mse" if recipe.grid == "hessian" else recipe.grid)
        return res, float("nan")
    H = cov.hessian().to(W.device)
    dXXt = cov.residual()
    if recipe.algo == "rtn":
        res = solve_rtn(W, spec, grid=recipe.grid, H=H)
    else:
        res = solve_gptq(
            W, H, spec,
            damp=recipe.damp, block_size=recipe.block_size, act_order=recipe.act_order,
            static_groups=recipe.act_order or recipe.refine_scales, grid=recipe.grid,
        )
    if recipe.refine_scales:
        res = refine_group_scales(W, H, res)
    return res, float(layer_loss(W, res.qweight, H))
