"""Peak memory of `onnxq quantize` per solver: the quantizing process, its solver helper, and the two together.

    python -m benchmarks.memory [--model PATH.onnx] [--algos rtn gptq turboboa turboboa:1 main] [--out benchmarks/results]

Each solver runs `onnxq quantize MODEL -o WORK/A.onnx --algo A` in a fresh process (default recipe); `A:1` runs it
with OMP_NUM_THREADS=1: torch on one thread, so one solver lane and no helper process (ORT keeps its own threads).
`main` is the README's main job without --eval: `onnxq quantize smollm2 -o WORK/main` (a generation-ready folder,
from the registry name; its builder graph is cached after the first run). The quantizing
process's peak is the one its report prints (ru_maxrss); every 20 ms this script also reads the resident (RSS) and
proportional (PSS: shared pages split between the processes mapping them) sizes of that process and its solver
helper from /proc (Linux), for the peak of their sum. Writes memory-<date>.{json,md} (`--name`).
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from onnxq.report import report_file

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="a .onnx file (default: the cached SmolLM2 export)")
    p.add_argument("--algos", nargs="*", default=["rtn", "gptq", "turboboa", "turboboa:1"])
    p.add_argument("--work", type=Path, default=Path("/tmp/onnxq-memory"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default=f"memory-{dt.date.today().isoformat()}", help="results file name, no suffix")
    args = p.parse_args(argv)
    from benchmarks.run import machine, versions
    from onnxq.models.export import export_onnx

    model = args.model or export_onnx("smollm2")
    result = {"command": "python -m benchmarks.memory " + shlex.join(sys.argv[1:] if argv is None else argv),
              "date": dt.datetime.now().isoformat(timespec="minutes"), "machine": machine("cpu"),
              "versions": versions(), "model": str(model), "file_mib": round(Path(model).stat().st_size / MIB, 1),
              "rows": []}
    onnxq = str(Path(sys.executable).with_name("onnxq"))  # the console script beside this interpreter
    args.work.mkdir(parents=True, exist_ok=True)
    for name in args.algos:
        algo, one_lane = name.split(":")[0], name.endswith(":1")
        if name == "main":
            out = args.work / "main"
            cmd = [onnxq, "quantize", "smollm2", "-o", str(out)]
        else:
            out = args.work / f"{algo}{'-1' if one_lane else ''}.onnx"
            cmd = [onnxq, "quantize", str(model), "-o", str(out), "--algo", algo]
        env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if one_lane else {})}
        row = {"algo": name, **_measure(cmd, env), "output_sha1": _digest(out)}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    stem = args.out / args.name
    report_file(stem, ".json").write_text(json.dumps(result, indent=1))
    report_file(stem, ".md").write_text(_markdown(result))
    return 0


def _measure(cmd: list[str], env: dict[str, str]) -> dict:
    """Run `cmd`; its report's figures and the sampled peaks (MiB) of its RSS, and of RSS and PSS summed with its children."""
    peak = {"sum_rss": 0.0, "sum_pss": 0.0}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: progress output never blocks the run
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        while proc.poll() is None:
            sizes = [_sizes(pid) for pid in [proc.pid, *_children(proc.pid)]]
            peak["sum_rss"] = max(peak["sum_rss"], sum(s[0] for s in sizes))
            peak["sum_pss"] = max(peak["sum_pss"], sum(s[1] for s in sizes))
            time.sleep(0.02)
        log.seek(0)
        text = log.read()
    if proc.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{text[-2000:]}")
    report = " ".join(text.split())
    main_mib = re.search(r"peak RSS (\d+) MiB", report)
    helper = re.search(r"\+ (\d+) MiB solver helper", report)
    total = re.search(r"calibration tokens, ([\d.]+) s", report)
    return {"process_mib": int(main_mib.group(1)), "helper_mib": int(helper.group(1)) if helper else 0,
            "sum_rss_mib": round(peak["sum_rss"]), "sum_pss_mib": round(peak["sum_pss"]),
            "quantize_s": float(total.group(1)), "wall_s": round(time.perf_counter() - t0, 1)}


def _digest(out: Path) -> str:
    """SHA-1 (12 hex digits) of a written .onnx file, or of a folder's model.onnx and model.onnx.data in turn."""
    files = [out / "model.onnx", out / "model.onnx.data"] if out.is_dir() else [out]
    sha = hashlib.sha1()
    for f in files:
        sha.update(f.read_bytes())
    return sha.hexdigest()[:12]


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (Linux /proc)."""
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def _sizes(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of `pid` in MiB; zeros once it is gone."""
    try:
        fields = dict(line.split()[:2] for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(fields.get("Rss:", 0)) / 1024, int(fields.get("Pss:", 0)) / 1024


def _markdown(result: dict) -> str:
    f = result["file_mib"]
    lines = [f"# Peak memory of `onnxq quantize` ({result['date']})", "", f"`{result['command']}`", "",
             f"Machine: {result['machine']}. Model: `{result['model']}`, {f} MiB; 2x the file = {2 * f:.0f} MiB.", "",
             "| solver | quantizing process | x file | + solver helper | both, RSS | x file | both, PSS | x file "
             "| quantize (s) | output SHA-1 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['algo']} | {r['process_mib']} MiB | {r['process_mib'] / f:.2f} | {r['helper_mib'] or 'none'} "
                     f"| {r['sum_rss_mib']} MiB | {r['sum_rss_mib'] / f:.2f} | {r['sum_pss_mib']} MiB "
                     f"| {r['sum_pss_mib'] / f:.2f} | {r['quantize_s']:.1f} | {r['output_sha1']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
