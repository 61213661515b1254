"""The LM head's GPTQ (SmolLM2 shape 49152 x 576, random weights, the folder's head recipe) whole or in row pieces:
time and peak RSS of a fresh process.

    python benchmarks/results/memory-2026-12-06-head.py pieces|whole"""
import time, torch, resource
from onnxq.solvers import QuantSpec, solve_gptq
from onnxq.solve.dispatch import by_row_pieces
from onnxq.recipe import QuantRecipe
torch.manual_seed(0)
W = torch.randn(49152, 576) * 0.05
X = torch.randn(4096, 576) * torch.rand(576) * 3; H = X.T @ X / 4096
r = QuantRecipe().for_output(True).head_recipe().validate()
spec = QuantSpec(r.bits, r.group_size, r.sym, False)
solve = lambda w: solve_gptq(w, H, spec, damp=r.damp, block_size=r.block_size, act_order=r.act_order, static_groups=True, grid=r.grid)
import sys
t = time.perf_counter()
res = by_row_pieces(solve, W) if sys.argv[1] == "pieces" else solve(W)
print(sys.argv[1], f"{time.perf_counter()-t:.1f}s peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss//1024} MiB")
