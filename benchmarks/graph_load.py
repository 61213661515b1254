"""Peak memory of loading one .onnx file three ways: onnx-ir, onnx, onnxq's weightless loader (one process each).

    python -m benchmarks.graph_load [--model PATH.onnx]

Prints one line per loader: initializers found, seconds, peak RSS (ru_maxrss) of a fresh process that only loads.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

LOADERS = ("onnx_ir", "onnx", "onnxq")


def _load(loader: str, path: str) -> int:
    """Load `path` with `loader`; the number of initializers."""
    if loader == "onnx_ir":
        import onnx_ir as ir
        return len(ir.load(path).graph.initializers)
    if loader == "onnx":
        import onnx
        return len(onnx.load(path).graph.initializer)
    from onnxq.graph.io import load_weightless
    return len(load_weightless(path)[0].graph.initializer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(Path.home() / ".cache/onnxq/onnx/smollm2/model.onnx"))
    p.add_argument("--one", choices=LOADERS, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.one:
        t0 = time.perf_counter()
        n = _load(args.one, args.model)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {args.one} | {n} | {time.perf_counter() - t0:.1f} | {peak:.0f} |")
        return 0
    size = Path(args.model).stat().st_size / 2**20
    print(f"{args.model}: {size:.1f} MiB\n\n| loader | initializers | seconds | peak RSS (MiB) |\n|---|---:|---:|---:|")
    for loader in LOADERS:
        subprocess.run([sys.executable, "-m", "benchmarks.graph_load", "--model", args.model, "--one", loader], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
