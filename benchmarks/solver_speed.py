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

from onnxq.report import report_file

import torch

from benchmarks.run import group_name
from onnxq.solvers import QuantSpec, layer_loss, solve_boa, solve_gptq, solve_turboboa


def problem(d_out: int, heads: int, d_in: int = 576, d_h: int = 64, seed: int = 0):
    """W [d_out, d_in], H_in [d_in, d_in], H_out [heads, d_h, d_h] with realistic correlation."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5 + torch.eye(d_in)
    X = torch.randn(8192, d_in, generator=g) @ mix
    K = torch.randn(heads, 2048, d_h, generator=g) @ (torch.randn(heads, d_h, d_h, generator=g) / d_h**0.5 + torch.eye(d_h))
    W = torch.randn(d_out, d_in, generator=g) * 0.05
    return W, 2 * X.T @ X / X.shape[0], K.transpose(1, 2) @ K / K.shape[1]


def timed(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    """Median wall time of fn() (CUDA work waited for) and its last result; one untimed warm-up run on a GPU."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        fn()
        sync()
    times, res = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), res


def cases(W, H, Ho, spec: QuantSpec, heads: int) -> dict:
    """The solvers compared, as thunks."""
    return {
        "gptq": lambda: solve_gptq(W, H, spec, grid="hessian"),
        "boa (N=1)": lambda: solve_boa(W, H, Ho, spec, n_heads=heads),
        "turboboa N=16, F1 only": lambda: solve_turboboa(W, H, Ho, spec, n_heads=heads, rows_per_block=16, refine=False),
        "turboboa N=16, F1+F3": lambda: solve_turboboa(W, H, Ho, spec, n_heads=heads, rows_per_block=16, refine=True),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--devices", nargs="+", default=["cpu"], help="torch devices, side by side (e.g. cpu cuda)")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, d_out, heads in (("q_proj", 576, 9), ("k_proj", 192, 3)):
        problem_cpu = problem(d_out, heads)
        for spec in (QuantSpec(2, -1, False), QuantSpec(4, 128, False)):
            for dev in map(torch.device, args.devices):
                W, H, Ho = (t.to(dev) for t in problem_cpu)
                for label, fn in cases(W, H, Ho, spec, heads).items():
                    sec, res = timed(fn, args.repeats, dev)
                    loss = float(layer_loss(W, res.qweight, H, Ho, n_heads=heads))
                    rows.append({"layer": name, "setting": f"W{spec.bits} {group_name(spec.group_size)}",
                                 "device": dev.type, "solver": label, "seconds": round(sec, 3), "kron_loss": loss})
                    print(rows[-1], flush=True)
    write(Path(args.out), args, rows)


def write(out: Path, args, rows: list[dict]) -> None:
    """Markdown table with TurboBoA/BoA ratios per device (and GPU/CPU ratios), and the JSON."""
    out.mkdir(parents=True, exist_ok=True)
    devices = list(dict.fromkeys(r["device"] for r in rows))
    suffix = "" if devices == ["cpu"] else "-" + "-".join(devices)
    stem = out / f"solver-speed{suffix}-{dt.date.today().isoformat()}"
    gpu = f", {torch.cuda.get_device_name(0)}" if "cuda" in devices else ""
    cmd = f"python -m benchmarks.solver_speed --repeats {args.repeats}" + (
        f" --devices {' '.join(args.devices)}" if suffix else "") + (f" --threads {args.threads}" if args.threads != 1 else "")
    head = (f"`{cmd}` on {platform.machine()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, "
            f"{args.threads} CPU thread{'s' * (args.threads != 1)}; medians of {args.repeats} runs"
            + ("; CUDA: after one warm-up run, timed to the end of the GPU work" if "cuda" in devices else "") + ".")
    lines = ["# Solver speed: BoA vs TurboBoA vs GPTQ (SmolLM2-shaped Q/K layers)", "", head, "",
             "| layer | setting | device | solver | solve time (s) | Kronecker loss tr(H_out ΔW H_in ΔWᵀ) |",
             "|---|---|---|---|---:|---:|"]
    lines += [f"| {r['layer']} | {r['setting']} | {r['device']} | {r['solver']} | {r['seconds']:.3f} | {r['kron_loss']:.4g} |"
              for r in rows]
    sec = {(r["layer"], r["setting"], r["device"], r["solver"]): r["seconds"] for r in rows}
    lines.append("")
    for layer, setting, dev in dict.fromkeys((r["layer"], r["setting"], r["device"]) for r in rows):
        t = lambda solver: sec[(layer, setting, dev, solver)]  # noqa: E731
        line = f"- {layer} {setting} on {dev}: TurboBoA(N=16, F1+F3) / BoA = {t('turboboa N=16, F1+F3') / t('boa (N=1)'):.3f}"
        if dev != "cpu" and (layer, setting, "cpu", "gptq") in sec:
            line += "; time on " + dev + " / cpu: " + ", ".join(
                f"{s} {t(s) / sec[(layer, setting, 'cpu', s)]:.2f}" for s in ("gptq", "boa (N=1)", "turboboa N=16, F1+F3"))
        lines.append(line)
    report_file(stem, ".md").write_text("\n".join(lines) + "\n")
    report_file(stem, ".json").write_text(json.dumps({"command": head, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
