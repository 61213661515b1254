"""Size-budgeted mixed precision: onnxq --size-mb at the byte sizes of onnxruntime-genai's own int4 builds, against
those builds and onnxq's uniform recipes near those sizes; PPL vs size, one run.

    python -m benchmarks.mixed [--model smollm2] [--work out/mixed-bench] [--out benchmarks/results]

Every row is a generation-ready folder (the builder's graph), scored as `benchmarks.deploy` scores PPL and size (SOTU
2017-2021, first 4096 tokens, 512-token windows, ORT CPU EP; graph + external data, 10^6 bytes). The mixed rows take
their --size-mb from the builder files measured in the same run. Writes mixed-<date>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from onnxq.report import report_file

from benchmarks.deploy import ROOT, ROWS, _put, build, header, start

BUILDER = {"builder int4 g32 (default)": "int4", "builder int4 g32 k_quant_mixed": "k_quant"}
HEAD4 = ["--head-bits", "4", "--head-group", "32"]
# name -> (CLI options, the builder row whose size is the budget, or None for a uniform recipe)
ONNXQ = {
    "onnxq mixed @ k_quant_mixed size": ([], "k_quant"),
    "onnxq mixed @ int4 size, head int4 g32": (HEAD4, "int4"),
    "onnxq mixed @ int4 size, head int8 g64": ([], "int4"),
    "onnxq uniform W4 g32, head int4 g64": (["--group", "32", "--head-bits", "4", "--head-group", "64"], None),
    "onnxq uniform W4 g64, head int4 g32": (HEAD4, None),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "mixed-bench")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    from onnxq.runtime.evaluate import file_size, perplexity

    hf, windows, stem, result = start("mixed", args, argv)
    sizes = {}

    def run(name: str, how: tuple, folder: Path) -> dict:
        print(f"== {name}", flush=True)
        row = {"name": name, **build(name, how, hf, args.model, folder)}
        row.update(ppl=round(perplexity(folder / "model.onnx", windows), 3),
                   size_mb=round(file_size(folder / "model.onnx") / 1e6, 3))
        report = Path(f"{folder}-report.json")
        if report.is_file():
            row["allocation"] = json.loads(report.read_text()).get("allocation", {})
        _put(result["rows"], row)
        print(json.dumps(row), flush=True)
        _write(stem, result)
        return row

    for name, key in BUILDER.items():
        sizes[key] = run(name, ROWS[name], args.work / key)["size_mb"]
    for name, (options, budget) in ONNXQ.items():
        folder = args.work / name.replace(" ", "-").replace(",", "").replace("@", "at")
        extra = ["--size-mb", f"{sizes[budget]:.3f}"] if budget else []
        run(name, ("onnxq", [*options, *extra, "--report", f"{folder}-report"]), folder)
    return 0


def _write(stem: Path, result: dict) -> None:
    """JSON, Markdown table and the PPL-vs-size plot (rewritten after every row)."""
    lines = header(stem, result, "Size-budgeted mixed precision") + [
             "Generation-ready folders scored alike: PPL on SOTU 2017-2021 (first 4096 tokens, 512-token windows, ORT "
             "CPU EP); size = graph + external data (10^6 bytes). onnxq rows: TurboBoA (the default solver), W4 g64 "
             "unless stated; `--size-mb` rows take the builder file's size measured above as their budget.", "",
             "| build | PPL | size (MB) | budget (MB) | formats chosen | quantization (s) | command |",
             "|---|---:|---:|---:|---|---:|---|"]
    for r in result["rows"]:
        a = r.get("allocation") or {}
        formats = ", ".join(f"{k}: {v}" for k, v in a.get("formats", {}).items())
        lines.append(f"| {r['name']} | {r['ppl']:.2f} | {r['size_mb']:.2f} | {a.get('budget_mb') or ''} | {formats} "
                     f"| {r['quant_s']:.0f} | `{r['command']}` |")
    report_file(stem, ".md").write_text("\n".join(lines) + "\n")
    _plot(report_file(stem, ".png"), result["rows"])


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker, color in (("builder", "s", "C1"), ("onnxq uniform", "o", "C0"), ("onnxq mixed", "^", "C2")):
        pts = sorted((r["size_mb"], r["ppl"], r["name"]) for r in rows if r["name"].startswith(kind))
        if pts:
            ax.plot([x for x, *_ in pts], [y for _, y, _ in pts], marker=marker, color=color, ls=":", label=kind)
            for x, y, name in pts:
                ax.annotate(name.removeprefix(kind).strip(" @,"), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity (SOTU eval)")
    ax.set_title("PPL vs size: onnxq mixed / uniform vs onnxruntime-genai builder", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
