"""Default TurboBoA on SmolLM2 with a block's layers solved side by side (helper processes) vs one after another.

    python -m benchmarks.lanes [--model smollm2]

Each mode quantizes in its own process, one after the other on the same machine, with the default recipe and
calibration; prints wall, calibration and solve seconds and a hash of each output file (they must be equal).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(mode: str, model: str, out: Path) -> dict:
    """One quantization in this process; `mode` "one-after-another" replaces solve_block by a plain loop."""
    import onnxq.pipeline as P
    from onnxq import QuantRecipe
    from onnxq.solve.dispatch import solve_layer

    if mode == "one-after-another":
        P.solve_block = lambda layers, weights, stats, r: [solve_layer(l, W, stats, r) for l, W in zip(layers, weights)]
    t = time.perf_counter()
    rep = P.quantize(model, QuantRecipe(), out, progress=False)
    wall = time.perf_counter() - t
    digest = hashlib.sha1()
    for p in sorted(out.parent.glob(out.name + "*")):
        digest.update(p.read_bytes())
    return {"mode": mode, "wall_s": round(wall, 1), "calib_s": round(rep.calib_seconds, 1),
            "solve_s": round(rep.solve_seconds, 1), "calib_tokens": rep.calib_tokens, "sha1": digest.hexdigest()[:12]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run(args.mode, args.model, Path(args.out))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("side-by-side", "one-after-another"):
            res = subprocess.run([sys.executable, "-m", "benchmarks.lanes", "--model", args.model, "--mode", mode,
                                  "--out", str(Path(tmp) / f"{mode}.onnx")], capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    same = rows[0]["sha1"] == rows[1]["sha1"]
    print(f"solve time ratio side-by-side / one-after-another: {rows[0]['solve_s'] / rows[1]['solve_s']:.2f}; "
          f"outputs {'identical' if same else 'DIFFER'}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
