"""Solve time of BoA (N=1) vs TurboBoA (N rows jointly) vs GPTQ on SmolLM2-shaped Q/K layers, side by side.

    python -m benchmarks.solver_speed [--repeats 3] [--out benchmarks/results]

Problem: q_proj of SmolLM2 (576 x 576, 9 heads of 64 rows) and k_proj (192 x 576, 3 KV heads), H_in from 8192
correlated random tokens, H_out per head from random keys; 2-bit per-channel (the BoA/TurboBoA default) and
4-bit group 128. Times are medians of `--repeats` runs in this process, one intra-op thread.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from onnxq.solvers import QuantSpec, layer_loss, solve_boa, solve_gptq, solve_turboboa


def problem(d_out: int, heads: int, d_in: int = 576, d_h: int = 64, seed: int = 0):
    """W [d_out, d_in], H_in [d_in, d_in], H_out [heads, d_h, d_h] with realistic correlation."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5 + torch.eye(d_in)
    X = torch.randn(8192, d_in, generator=g) @ mix
    K = torch.randn(heads, 2048, d_h, generator=g) @ (torch.randn(heads, d_h, d_h, generator=g) / d_h**0.5 + torch.eye(d_h))
    W = torch.randn(d_out, d_in, generator=g) * 0.05
    return W, 2 * X.T @ X / X.shape[0], K.transpose(1, 2) @ K / K.shape[1]


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of fn() and its last result."""
    times, res = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, d_out, heads in (("q_proj", 576, 9), ("k_proj", 192, 3)):
        W, H, Ho = problem(d_out, heads)
        for spec in (QuantSpec(2, -1, False), QuantSpec(4, 128, False)):
            cases = {
                "gptq": lambda: solve_gptq(W, H, spec, grid="hessian"),
                "boa (N=1)": lambda: solve_boa(W, H, Ho, spec, n_heads=heads),
                "turboboa N=16, F1 only": lambda: solve_turboboa(W, H, Ho, spec, n_heads=heads, rows_per_block=16, refine=False),
                "turboboa N=16, F1+F3": lambda: solve_turboboa(W, H, Ho, spec, n_heads=heads, rows_per_block=16, refine=True),
            }
            for label, fn in cases.items():
                sec, res = timed(fn, args.repeats)
                loss = float(layer_loss(W, res.qweight, H, Ho if label != "gptq" else Ho, n_heads=heads))
                rows.append({"layer": name, "setting": f"W{spec.bits} {'pc' if spec.group_size == -1 else 'g%d' % spec.group_size}",
                             "solver": label, "seconds": round(sec, 3), "kron_loss": loss})
                print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"solver-speed-{dt.date.today().isoformat()}"
    head = f"`python -m benchmarks.solver_speed --repeats {args.repeats}` on {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread; medians of {args.repeats} runs."
    lines = ["# Solver speed: BoA vs TurboBoA vs GPTQ (SmolLM2-shaped Q/K layers)", "", head, "",
             "| layer | setting | solver | solve time (s) | Kronecker loss tr(H_out ΔW H_in ΔWᵀ) |", "|---|---|---|---:|---:|"]
    lines += [f"| {r['layer']} | {r['setting']} | {r['solver']} | {r['seconds']:.3f} | {r['kron_loss']:.4g} |" for r in rows]
    for layer in ("q_proj", "k_proj"):
        for setting in ("W2 pc", "W4 g128"):
            sel = {r["solver"]: r["seconds"] for r in rows if r["layer"] == layer and r["setting"] == setting}
            lines.append(f"\n{layer} {setting}: TurboBoA(N=16, F1+F3) / BoA = {sel['turboboa N=16, F1+F3'] / sel['boa (N=1)']:.3f}")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"command": head, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
