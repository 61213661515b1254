"""Deployment benchmark: onnxq's generation-ready folders against onnxruntime-genai's own builds, scored one way.

    python -m benchmarks.deploy [--model smollm2] [--only NAME ...] [--repeats 3] [--out benchmarks/results]

Every row is a folder onnxruntime-genai loads (the builder's graph: GroupQueryAttention, fused norms, KV cache).
Scored alike: perplexity on the same windows (first 4096 tokens of SOTU 2017-2021, 512-token windows, ORT CPU EP),
bytes on disk of every file the model reads (graph + external data), quantization wall time, and prefill / batch-1
decode tokens/s from one ORT loop for all (`benchmarks.latency.measure`: 512-token prefill; decode of 64 tokens after
a 128-token context, KV cache fed back; median of `--repeats` after one warm-up). Writes deploy-<date>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from onnxq.report import report_file

ROOT = Path(__file__).resolve().parent.parent

# name -> how the row is built: ("builder", precision, extra options) or ("onnxq", CLI options)
ROWS = {
    "builder fp32": ("builder", "fp32", {}),
    "builder int4 g32 (default)": ("builder", "int4", {}),
    "builder int4 g32 k_quant_mixed": ("builder", "int4", {"algo_config": "k_quant_mixed"}),
    "builder int4 g128 sym": ("builder", "int4", {"block_size": "128"}),
    "onnxq RTN W4 g128": ("onnxq", ["--algo", "rtn", "--group", "128"]),
    "onnxq GPTQ W4 g128": ("onnxq", ["--algo", "gptq", "--group", "128"]),
    "onnxq TurboBoA W4 g128": ("onnxq", ["--algo", "turboboa", "--group", "128"]),
    "onnxq default (TurboBoA W4 g64)": ("onnxq", []),
    "onnxq TurboBoA W4 g64, head int4 g32": ("onnxq", ["--head-bits", "4", "--head-group", "32"]),
    "onnxq TurboBoA W4 g64 + bias correction, 32 windows": ("onnxq", ["--bias-correction", "--calib-windows", "32"]),
}
EXACT = "onnxq default (TurboBoA W4 g64)"  # also scored with accuracy_level 0, to measure what level 4 costs


def build(name: str, how: tuple, hf: Path, model: str, out: Path) -> dict:
    """Make row `name`'s folder in `out`; returns its build facts (wall time, command)."""
    if out.exists():
        shutil.rmtree(out)
    t = time.perf_counter()
    if how[0] == "builder":
        from onnxq.deploy.builder import run_builder

        run_builder(hf, out, precision=how[1], extra_options=how[2])
        cmd = f"python -m onnxruntime_genai.models.builder -i {hf.name} -o OUT -p {how[1]} -e cpu" + \
              "".join(f" --extra_options {k}={v}" for k, v in how[2].items())
        return {"quant_s": round(time.perf_counter() - t, 1), "command": cmd}
    from onnxq.cli import app

    argv = ["quantize", model, "-o", str(out), *how[1]]
    from typer.testing import CliRunner

    done = CliRunner().invoke(app, argv)
    if done.exit_code != 0:
        raise RuntimeError(f"{name}: {done.output.strip().splitlines()[-1] if done.output.strip() else done.exit_code}")
    line = next((l for l in done.output.splitlines() if l.startswith("generation check:")), "")
    return {"quant_s": round(time.perf_counter() - t, 1), "command": "onnxq " + shlex.join(argv[:2] + ["-o", "OUT"] + how[1]),
            "generation": line.removeprefix("generation check: ")}


def score(folder: Path, windows, repeats: int) -> dict:
    """Perplexity, size on disk and prefill/decode speed of one folder's model.onnx."""
    from benchmarks.latency import measure
    from onnxq.runtime.evaluate import file_size, perplexity

    path = folder / "model.onnx"
    lat = measure(path, prefill=512, context=128, decode=64, warmup=1, repeats=repeats)
    ms = lat["prefill_ms"]
    prefill = {k: round(512e3 / ms[m], 1) for k, m in (("median", "median"), ("min", "max"), ("max", "min"))}
    return {"ppl": round(perplexity(path, windows), 3), "size_mb": round(file_size(path) / 1e6, 2),
            "decode_tok_s": lat["decode_tok_s"], "prefill_tok_s": prefill}


def exact_twin(folder: Path, out: Path) -> Path:
    """A copy of `folder` whose MatMulNBits use accuracy_level 0 (exact fp32 activations)."""
    from benchmarks.latency import restamp

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("model.onnx", "model.onnx.data"))
    restamp(folder / "model.onnx", out / "model.onnx", 0)
    return out


def start(name: str, args, argv: list[str] | None) -> tuple[Path, object, Path, dict]:
    """(HF folder, PPL windows, results stem, result header) of a `benchmarks.<name>` run on `args.model`."""
    from benchmarks.run import machine, versions
    from onnxq.calibrate.textdata import load_text, token_windows
    from onnxq.models.export import export_onnx, hf_folder, load_tokenizer

    windows = token_windows(load_tokenizer(export_onnx(args.model)), load_text("sotu-eval"), 512, 8)
    result = {"command": f"python -m benchmarks.{name} " + shlex.join(sys.argv[1:] if argv is None else argv),
              "date": dt.datetime.now().isoformat(timespec="minutes"), "machine": machine("cpu"),
              "versions": versions(), "windows": [int(x) for x in windows.shape], "rows": []}
    return hf_folder(args.model), windows, args.out / f"{name}-{dt.date.today().isoformat()}", result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--only", nargs="*", default=None, help="row names (substrings) to run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=ROOT / "out" / "deploy-bench")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    hf, windows, stem, result = start("deploy", args, argv)
    if args.only and report_file(stem, ".json").is_file():  # a partial rerun keeps today's other rows
        result["rows"] = json.loads(report_file(stem, ".json").read_text())["rows"]
    for name, how in ROWS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        folder = args.work / name.split(" (")[0].replace(" ", "-").replace(",", "").replace("+", "plus")
        print(f"== {name}", flush=True)
        row = {"name": name, **build(name, how, hf, args.model, folder)}
        row.update(score(folder, windows, args.repeats))
        _put(result["rows"], row)
        print(json.dumps(row), flush=True)
        if name == EXACT:
            twin = {"name": name + ", accuracy_level 0", "command": row["command"] + " --accuracy-level 0 (restamped)",
                    "quant_s": row["quant_s"], **score(exact_twin(folder, folder.with_name(folder.name + "-acc0")),
                                                        windows, args.repeats)}
            _put(result["rows"], twin)
            print(json.dumps(twin), flush=True)
        _write(stem, result)
    return 0


def _put(rows: list[dict], row: dict) -> None:
    """Add `row`, replacing an earlier row of the same name in place."""
    for i, r in enumerate(rows):
        if r["name"] == row["name"]:
            rows[i] = row
            return
    rows.append(row)


def header(stem: Path, result: dict, title: str) -> list[str]:
    """Write the JSON; the Markdown's first lines: title, command, machine."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    report_file(stem, ".json").write_text(json.dumps(result, indent=1))
    return [f"# {title} ({result['date']})", "", f"`{result['command']}`", "", f"Machine: {result['machine']}.", ""]


def _write(stem: Path, result: dict) -> None:
    """JSON, Markdown table and PPL-vs-size plot (rewritten after every row, so a stopped run keeps what it measured)."""
    lines = header(stem, result, "Deployment benchmark") + [
             "Every row is a folder onnxruntime-genai loads. PPL: SOTU 2017-2021, first 4096 tokens, 512-token windows, "
             "ORT CPU EP. Size: graph + external data on disk (10^6 bytes). Decode: batch 1, 64 tokens after a 128-token "
             "context, KV cache fed back; prefill: 512 tokens; medians of the repeats [min-max], one ORT loop for all "
             "(`benchmarks.latency.measure`). Quantization time: wall time of the build (the builder's cached HF folder "
             "as input; onnxq: export cache warm, calibration + solve + write + generation check).", "",
             "| build | PPL | size (MB) | decode tok/s | prefill tok/s | quantization (s) | command |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        d, f = r["decode_tok_s"], r["prefill_tok_s"]
        lines.append(f"| {r['name']} | {r['ppl']:.2f} | {r['size_mb']:.1f} | {d['median']:.1f} [{d['min']:.1f}–{d['max']:.1f}] "
                     f"| {f['median']:.0f} [{f['min']:.0f}–{f['max']:.0f}] | {r['quant_s']:.0f} | `{r['command']}` |")
    gens = [f"- {r['name']}: {r['generation']}" for r in result["rows"] if r.get("generation")]
    if gens:
        lines += ["", "Generation check printed by each onnxq run (onnxruntime-genai, greedy):", *gens]
    report_file(stem, ".md").write_text("\n".join(lines) + "\n")
    _plot(report_file(stem, ".png"), result["rows"])


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if "fp32" in r["name"] or "accuracy_level 0" in r["name"]:  # the float line; the same weights as a row
            continue
        mine = r["name"].startswith("onnxq")
        ax.scatter(r["size_mb"], r["ppl"], marker="o" if mine else "s", color="C0" if mine else "C1")
        ax.annotate(r["name"].replace("onnxq ", "").replace("builder ", "b: "), (r["size_mb"], r["ppl"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    fp32 = next((r for r in rows if "fp32" in r["name"]), None)
    if fp32:
        ax.axhline(fp32["ppl"], color="gray", ls="--", lw=0.8, label=f"fp32 {fp32['ppl']:.2f} ({fp32['size_mb']:.0f} MB)")
        ax.legend(fontsize=7)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity (SOTU eval)")
    ax.set_title("onnxq (circles) vs onnxruntime-genai builder (squares)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
