"""Side-by-side benchmark: onnxq solvers vs ONNX Runtime's quantizer on the same model, text and machine.

    python -m benchmarks.run --suite issue2 [--out benchmarks/results]

Every job runs in its own process (wall time and peak RSS are its own); every model is scored by the same
perplexity code on the same windows (SOTU 2017-2021, first 4096 tokens, 512-token windows, ORT CPU).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

W = dict(sym=False, format="nbits")
SUITES: dict[str, list[dict]] = {
    "smoke": [dict(tool="onnxq", algo="rtn", bits=4, group_size=32, **W)],
    "issue2": [
        dict(tool="ort", ort_method="default", bits=4, group_size=128, sym=False),
        dict(tool="ort", ort_method="hqq", bits=4, group_size=128, sym=False),
        dict(tool="onnxq", algo="rtn", bits=4, group_size=128, **W),
        dict(tool="onnxq", algo="gptq", bits=4, group_size=128, **W),
        dict(tool="onnxq", algo="gptq", bits=3, group_size=128, sym=False, format="qdq"),
        dict(tool="onnxq", algo="gptq", bits=2, group_size=64, **W),
    ],
    "issue3": [
        dict(tool="onnxq", algo=a, bits=b, group_size=g, **({**W, "format": "qdq"} if b == 3 else W))
        for b, g in ((3, 128), (2, 64), (2, -1))
        for a in ("rtn", "gptq", "boa", "turboboa")
    ]
    + [dict(tool="onnxq", algo="turboboa", bits=4, group_size=128, **W)],
}


def label(cfg: dict) -> str:
    """Row label: tool/algorithm and setting."""
    algo = cfg.get("ort_method") or cfg.get("algo")
    g = "pc" if cfg["group_size"] == -1 else f"g{cfg['group_size']}"
    extra = "+gso" if cfg.get("refine_scales") else ""
    return f"{cfg['tool']}:{algo}{extra} W{cfg['bits']} {g} {'sym' if cfg['sym'] else 'asym'}"


def versions() -> dict:
    """Versions of the parts that decide the numbers."""
    import onnx
    import onnxruntime
    import torch

    import onnxq

    return {"onnxq": onnxq.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "torch": torch.__version__, "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="issue2", choices=sorted(SUITES))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--work", default=os.environ.get("ONNXQ_BENCH_WORK", "/tmp/onnxq-bench"))
    ap.add_argument("--only", default="", help="substring filter on row labels")
    args = ap.parse_args()

    from onnxq.models.export import load_tokenizer, resolve_model
    from onnxq.recipe import QuantRecipe
    from onnxq.runtime.evaluate import file_size, perplexity
    from onnxq.textdata import load_text, token_windows

    model = resolve_model(args.model)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    windows = token_windows(load_tokenizer(model), load_text("sotu-eval"), 512, 8)
    date = dt.date.today().isoformat()
    stem = Path(args.out) / f"{date}-{args.suite}"
    rows = [{"label": "float (fp32 export)", "ppl": round(perplexity(model, windows), 3), "size_mb": round(file_size(model) / 2**20, 1)}]
    print(rows[-1], flush=True)
    for i, cfg in enumerate(SUITES[args.suite]):
        if args.only and args.only not in label(cfg):
            continue
        out = work / f"{args.suite}-{i}.onnx"
        proc = subprocess.run([sys.executable, "-m", "benchmarks.job", json.dumps(cfg), str(model), str(out)],
                              capture_output=True, text=True)
        row = {"label": label(cfg), **cfg}
        if proc.returncode != 0:
            row["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
        else:
            job = json.loads(out.with_suffix(".job.json").read_text())
            row.update(job, ppl=round(perplexity(out, windows), 3), size_mb=round(file_size(out) / 2**20, 1))
        rows.append(row)
        print({k: row.get(k) for k in ("label", "ppl", "size_mb", "seconds", "peak_rss_mb", "error")}, flush=True)
        write(stem, args, rows, model, QuantRecipe())


def write(stem: Path, args, rows: list[dict], model: Path, recipe) -> None:
    """Markdown table and JSON with the header facts (machine, versions, tokens, command)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    head = {
        "command": f"python -m benchmarks.run --suite {args.suite}" + (f" --only '{args.only}'" if args.only else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "versions": versions(),
        "model": str(model),
        "eval": "SOTU 2017-2021, first 4096 tokens, 8 non-overlapping 512-token windows, ORT CPU EP",
        "calibration": f"SOTU 1990-2016, {recipe.calib_windows} random 512-token windows (seed {recipe.seed}) for onnxq; "
                       "ORT RTN/HQQ use no calibration data",
    }
    stem.with_suffix(".json").write_text(json.dumps({"header": head, "rows": rows}, indent=2))
    fp = rows[0]["ppl"]
    lines = [f"# Benchmark `{args.suite}` ({stem.name})", ""] + [f"- {k}: {v}" for k, v in head.items()] + [
        "", "| setting | PPL | Δ vs fp32 | size (MB) | quant time (s) | calib tokens | peak RSS (MiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | | |")
            continue
        d = "" if r is rows[0] else f"{r['ppl'] - fp:+.2f}"
        lines.append(f"| {r['label']} | {r['ppl']:.2f} | {d} | {r['size_mb']} | {r.get('seconds', '')} | {r.get('calib_tokens', '')} | {r.get('peak_rss_mb', '')} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
