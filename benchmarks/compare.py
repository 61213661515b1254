"""Compare two results files of `benchmarks.run` row by row: what is deterministic must repeat, times are ratios.

    python -m benchmarks.compare FIRST.json RERUN.json [-o OUT.md]

Deterministic columns (perplexity, bits per weight, file size, a row's error) must agree: exit 1 where one does not.
Quantization time and decode / prefill speed are reported as rerun/first ratios, with whether the two runs' latency
ranges (min-max over the repeats) overlap. Only rows (and variants: the same weights run in another form) present
in both files are compared.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

PPL_TOL = 1e-4  # relative, default: covers the rounding to 3 decimals; another CPU may round a few weights apart


@dataclass
class RowDiff:
    """One label's comparison: mismatching deterministic fields and the rerun/first ratios of the timed ones."""

    label: str
    first: dict
    rerun: dict
    mismatches: list[str] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)  # seconds, decode, prefill: rerun / first
    overlap: dict[str, bool] = field(default_factory=dict)  # decode, prefill: min-max ranges of the repeats overlap


def _decode(row: dict) -> dict | None:
    lat = row.get("latency") or {}
    return lat.get("decode_tok_s")


def _prefill(row: dict) -> dict | None:
    """Prefill tokens/s as {median, min, max}, from the prefill times (ms) of the repeats."""
    lat = row.get("latency") or {}
    ms, n = lat.get("prefill_ms"), lat.get("prefill_tokens")
    if not ms or not n:
        return None
    return {"median": n / (ms["median"] / 1e3), "min": n / (ms["max"] / 1e3), "max": n / (ms["min"] / 1e3)}


def _first_line(row: dict) -> str | None:
    """The error's first line with file names masked (each run names its work files after its suite)."""
    err = row.get("error")
    return None if err is None else re.sub(r"[\w./-]+\.onnx\b", "<file>", str(err).splitlines()[0])


def compare_rows(first: dict, rerun: dict, ppl_tol: float = PPL_TOL) -> RowDiff:
    """Compare one row of two runs; perplexities agree within `ppl_tol` relative."""
    d = RowDiff(first["label"], first, rerun)
    x, y = sorted((_first_line(first) or "", _first_line(rerun) or ""), key=len)
    if (x == "") != (y == "") or not y.startswith(x):  # rows store errors cut at a length: a prefix is the same
        d.mismatches.append("error")
    a, b = first.get("ppl"), rerun.get("ppl")
    if (a is None) != (b is None) or (a is not None and abs(a - b) > ppl_tol * abs(a)):
        d.mismatches.append("ppl")
    for key in ("bpw", "size_mb"):
        if first.get(key) != rerun.get(key):
            d.mismatches.append(key)
    if _first_line(first) or _first_line(rerun):  # a failed row's times say nothing about the tool's speed
        return d
    if first.get("seconds") and rerun.get("seconds"):
        d.ratios["seconds"] = rerun["seconds"] / first["seconds"]
    for name, get in (("decode", _decode), ("prefill", _prefill)):
        x, y = get(first), get(rerun)
        if x and y:
            d.ratios[name] = y["median"] / x["median"]
            d.overlap[name] = x["min"] <= y["max"] and y["min"] <= x["max"]
    return d


def _entries(data: dict) -> list[dict]:
    """The rows, then each variant (same weights run differently) as a row labelled "<row> · <form>"."""
    return data["rows"] + [{**v, "label": f"{v['label']} · {v['form']}"} for v in data.get("variants", [])]


def compare(first: dict, rerun: dict, ppl_tol: float = PPL_TOL) -> list[RowDiff]:
    """Rows and variants of both results files with the same label, in the first file's order."""
    later = {r["label"]: r for r in _entries(rerun)}
    return [compare_rows(r, later[r["label"]], ppl_tol) for r in _entries(first) if r["label"] in later]


def _cell(x: float | None, fmt: str) -> str:
    return "" if x is None else fmt.format(x)


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f} (median {sorted(values)[len(values) // 2]:.2f})" if values else "none"


def report(first_path: Path, rerun_path: Path, first: dict, rerun: dict, diffs: list[RowDiff],
           ppl_tol: float = PPL_TOL) -> str:
    """Markdown: both runs' headers, one line per row, and a summary computed from the rows."""
    lines = [f"# Rerun check: `{rerun_path.name}` against `{first_path.name}`", ""]
    for name, data in (("first", first), ("rerun", rerun)):
        h = data["header"]
        lines.append(f"- {name}: `{h.get('command', '?')}`, {h.get('date', '?')}, {h.get('machine', '?')}"
                     + (f"; resumed {', '.join(h['resumed'])}" if h.get("resumed") else ""))
    lines += ["", "| row | PPL first | PPL rerun | quant s first | quant s rerun | decode tok/s first | decode tok/s "
              "rerun | prefill tok/s first | prefill tok/s rerun | differs |", "|---|" + "---:|" * 8 + "---|"]
    for d in diffs:
        a, b = d.first, d.rerun
        if _first_line(a) and not d.mismatches:
            lines.append(f"| {d.label} | same error | | | | | | | | |")
            continue
        dec = [_cell((x or {}).get("median"), "{:.1f}") for x in (_decode(a), _decode(b))]
        pre = [_cell((x or {}).get("median"), "{:.0f}") for x in (_prefill(a), _prefill(b))]
        lines.append(f"| {d.label} | {_cell(a.get('ppl'), '{:.3f}')} | {_cell(b.get('ppl'), '{:.3f}')} | "
                     f"{_cell(a.get('seconds'), '{:.1f}')} | {_cell(b.get('seconds'), '{:.1f}')} | {dec[0]} | {dec[1]} | "
                     f"{pre[0]} | {pre[1]} | {', '.join(d.mismatches)} |")
    bad = [d for d in diffs if d.mismatches]
    measured = [d for d in diffs if d.first.get("ppl") is not None and not _first_line(d.first)]
    lines += ["", f"Rows and variants in both files: {len(diffs)}. Deterministic columns (PPL within {ppl_tol:.0e} "
              f"relative, bits per weight, size, error) agree on {len(diffs) - len(bad)}"
              + (f"; differ on {len(bad)}: " + "; ".join(f"{d.label} ({', '.join(d.mismatches)})" for d in bad)
                 if bad else f" ({len(measured)} with a perplexity)") + "."]
    for key, what in (("seconds", "quantization time"), ("decode", "decode speed"), ("prefill", "prefill speed")):
        values = [d.ratios[key] for d in diffs if key in d.ratios]
        text = f"- {what}, rerun / first: {_span(values)}"
        if key in ("decode", "prefill") and values:
            apart = [d.label for d in diffs if d.overlap.get(key) is False]
            text += f"; min–max ranges of the repeats overlap on {len(values) - len(apart)} of {len(values)} rows"
        lines.append(text)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", type=Path)
    ap.add_argument("rerun", type=Path)
    ap.add_argument("-o", "--out", type=Path, help="write the Markdown here (default: print it)")
    ap.add_argument("--ppl-tol", type=float, default=PPL_TOL, help="relative perplexity tolerance (default 1e-4)")
    args = ap.parse_args(argv)
    data = []
    for path in (args.first, args.rerun):
        try:
            data.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            print(f"error: cannot read results file {path}: {err}; give two .json files written by benchmarks.run",
                  file=sys.stderr)
            return 2
    diffs = compare(*data, ppl_tol=args.ppl_tol)
    if not diffs:
        print(f"error: {args.first} and {args.rerun} have no row label in common: compare runs of the same suite",
              file=sys.stderr)
        return 2
    text = report(args.first, args.rerun, *data, diffs, args.ppl_tol)
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    else:
        print(text, end="")
    return 1 if any(d.mismatches for d in diffs) else 0


if __name__ == "__main__":
    sys.exit(main())
