"""Peak RSS of `--calib self`'s sampling alone: 16 windows x 512 tokens from smollm2, seed 0, in a fresh process.

    python benchmarks/results/selfcalib-memory-2026-12-05.py"""
import hashlib
import resource

import onnxq
from onnxq.calibrate.selfcalib import generate_windows

windows, seconds = generate_windows("smollm2", 16, 512, seed=0)
print(f"onnxq {onnxq.__file__}: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, "
      f"{seconds:.1f} s, windows sha1 {hashlib.sha1(windows.tobytes()).hexdigest()[:12]}")
