"""Perplexity against bits per weight, one colour per tool, one marker per algorithm, with each tool's Pareto front.

    python -m benchmarks.plot benchmarks/results/<date>-<suite>.json [-o OUT.png]

Reads the JSON that `benchmarks.run` writes; rows that failed are left out. The fp32 model is the dashed line.
A point is on its tool's front when no other point of that tool has both fewer (or equal) bits per weight and a
lower perplexity.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

COLORS = {"onnxq": "tab:blue", "ort": "tab:orange"}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def points(rows: list[dict]) -> list[dict]:
    """Plottable rows: quantized, no error, finite PPL and bits per weight."""
    out = []
    for r in rows:
        if r.get("tool") in (None, "float") or "error" in r:
            continue
        ppl, bpw = r.get("ppl"), r.get("bpw")
        if isinstance(ppl, (int, float)) and isinstance(bpw, (int, float)) and math.isfinite(ppl) and math.isfinite(bpw):
            algo, _, setting = r["label"].partition(" ")
            out.append({"tool": r["tool"], "algo": algo.split(":", 1)[1], "setting": setting, "ppl": ppl, "bpw": bpw})
    return out


def pareto(pts: list[dict]) -> list[dict]:
    """Points not dominated by another (fewer or equal bits and lower PPL), by increasing bits per weight."""
    front, best = [], math.inf
    for p in sorted(pts, key=lambda p: (p["bpw"], p["ppl"])):
        if p["ppl"] < best:
            front.append(p)
            best = p["ppl"]
    return front


def plot(results: str | Path, out: str | Path | None = None) -> Path:
    """Write the PNG for a results JSON; returns its path (default: the JSON's path with .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = Path(results)
    data = json.loads(results.read_text())
    rows = data["rows"]
    out = Path(out) if out is not None else results.with_suffix(".png")
    pts = points(rows)
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    algos = sorted({(p["tool"], p["algo"]) for p in pts})
    marker = {a: MARKERS[i % len(MARKERS)] for i, a in enumerate(sorted({a for _, a in algos}))}
    for tool, algo in algos:
        mine = [p for p in pts if p["tool"] == tool and p["algo"] == algo]
        ax.scatter([p["bpw"] for p in mine], [p["ppl"] for p in mine], marker=marker[algo],
                   color=COLORS.get(tool, "tab:gray"), alpha=0.75, label=f"{tool}:{algo}", zorder=3)
    for k, tool in enumerate(sorted({p["tool"] for p in pts})):
        front = pareto([p for p in pts if p["tool"] == tool])
        offset = (4, -11) if k % 2 == 0 else (4, 4)  # one tool's labels below its points, the other's above
        ax.step([p["bpw"] for p in front], [p["ppl"] for p in front], where="post", color=COLORS.get(tool, "tab:gray"),
                lw=1.5, alpha=0.9, label=f"{tool} Pareto front", zorder=2)
        last_x, stack = -math.inf, 0
        for p in front:
            stack = stack + 1 if p["bpw"] - last_x < 0.4 else 0  # neighbours on x: move the label one line further
            last_x = p["bpw"]
            xy = (offset[0], offset[1] + (10 * stack if offset[1] > 0 else -10 * stack))
            ax.annotate(f"{p['algo']} {p['setting'].replace(' asym', '')}", (p["bpw"], p["ppl"]), fontsize=7,
                        xytext=xy, textcoords="offset points", color=COLORS.get(tool, "tab:gray"))
    fp = rows[0].get("ppl") if rows and rows[0].get("tool") == "float" else None
    if isinstance(fp, (int, float)) and math.isfinite(fp):
        ax.axhline(fp, color="black", ls="--", lw=1, label=f"fp32 ({fp:.2f})")
    ppls = [p["ppl"] for p in pts] + ([fp] if fp else [])
    if ppls and max(ppls) / max(min(ppls), 1e-9) > 3:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight of the quantized layers (scales and zero points included)")
    ax.set_ylabel("perplexity (lower is better)")
    head = data.get("header", {})
    ax.set_title(f"{Path(head.get('model', '')).parent.name or 'model'}: {results.stem}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="JSON written by benchmarks.run")
    ap.add_argument("-o", "--out", help="PNG path (default: beside the JSON)")
    args = ap.parse_args()
    print(plot(args.results, args.out))


if __name__ == "__main__":
    main()
