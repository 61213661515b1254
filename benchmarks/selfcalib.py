"""Data-free calibration against text calibration: the same TurboBoA recipe calibrated on SOTU text and on windows the
float model generated itself (`--calib self`), in one run.

    python -m benchmarks.selfcalib [--model smollm2] [--settings 4:128 3:128] [--out benchmarks/results]

PPL on the SOTU eval windows (first 4096 tokens, 512-token windows, ORT CPU EP); quantization time includes the
generation of the windows. Writes selfcalib-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

from onnxq.report import report_file

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--settings", nargs="*", default=["4:128", "3:128"], help="BITS:GROUP pairs")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "selfcalib-bench")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    from benchmarks.run import machine, versions
    from onnxq.pipeline import quantize
    from onnxq.recipe import QuantRecipe
    from onnxq.report import evaluate
    from onnxq.calibrate.selfcalib import TEMPERATURE, TOP_K

    result = {"command": "python -m benchmarks.selfcalib " + shlex.join(sys.argv[1:] if argv is None else argv),
              "date": dt.datetime.now().isoformat(timespec="minutes"), "machine": machine("cpu"),
              "versions": versions(), "rows": [], "sampler": {"temperature": TEMPERATURE, "top_k": TOP_K}}
    stem = args.out / f"selfcalib-{dt.date.today().isoformat()}"
    for setting in args.settings:
        bits, group = (int(x) for x in setting.split(":"))
        for calib in ("sotu-calib", "self"):
            out = args.work / f"w{bits}g{group}-{calib}.onnx"
            rep = quantize(args.model, QuantRecipe(algo="turboboa", bits=bits, group_size=group), out, calib=calib,
                           progress=False)
            ppl = evaluate(rep.model, out).quant.ppl
            row = {"bits": bits, "group": group, "calib": calib, "ppl": round(ppl, 3), "quant_s": rep.total_seconds,
                   "generation_s": rep.calib_generation_seconds, "calib_tokens": rep.calib_tokens}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if rep.calib_text:
                report_file(stem, f".w{bits}g{group}.calib.txt").write_text(rep.calib_text)
            _write(stem, result)
    return 0


def _write(stem: Path, result: dict) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    report_file(stem, ".json").write_text(json.dumps(result, indent=1))
    rows = result["rows"]
    lines = [f"# Data-free calibration ({result['date']})", "", f"`{result['command']}`", "",
             f"Machine: {result['machine']}.", "",
             "TurboBoA, .onnx output (LM head float), 16 × 512 calibration tokens; `self` = windows sampled from the "
             f"float model (seeded, temperature {result['sampler']['temperature']}, top-k {result['sampler']['top_k']} "
             "(0: the whole distribution); the text is in the .calib.txt files beside this one). "
             "PPL: SOTU 2017-2021, first 4096 tokens, 512-token windows, ORT CPU EP.", "",
             "| setting | calibration | PPL | vs SOTU | quantization (s) | of which generation (s) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ref = next((x for x in rows if (x["bits"], x["group"], x["calib"]) == (r["bits"], r["group"], "sotu-calib")), None)
        rel = f"{100 * (r['ppl'] / ref['ppl'] - 1):+.1f}%" if ref and r is not ref else ""
        lines.append(f"| W{r['bits']} g{r['group']} | {r['calib']} | {r['ppl']:.2f} | {rel} | {r['quant_s']:.0f} | "
                     f"{r['generation_s']:.0f} |")
    report_file(stem, ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
