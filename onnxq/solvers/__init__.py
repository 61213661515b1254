"""Pure-torch weight quantization solvers: grids, the shared OBS engine, RTN, GPTQ/GPTAQ, BoA, TurboBoA, gso."""
from .aespa import solve_aespa
from .bias import centered_hessian, centered_residual, output_bias
from .boa import solve_boa
from .codes import refine_codes
from .engine import obs_quantize
from .grid import QuantResult, QuantSpec, find_grid, hessian_weighted_grid, minmax_grid, mse_grid
from .gptq import solve_gptq
from .gso import refine_group_scales, solve_gso
from .hessian import derotate_average, factor, gqa_average, gqa_replicate, layer_loss, up_row_hessian, value_row_hessian
from .rtn import solve_rtn
from .turboboa import solve_turboboa

__all__ = [
    "QuantResult", "QuantSpec", "centered_hessian", "centered_residual", "derotate_average", "factor", "find_grid", "gqa_average", "gqa_replicate",
    "hessian_weighted_grid", "layer_loss", "minmax_grid", "mse_grid", "obs_quantize", "output_bias", "refine_codes", "refine_group_scales",
    "up_row_hessian", "value_row_hessian",
    "solve_aespa", "solve_boa", "solve_gptq", "solve_gso", "solve_rtn", "solve_turboboa",
]
