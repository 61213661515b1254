"""Peak RSS of a folder quantize by phase (one-off probe: a 20 Hz sampler thread, phases set by wrapped functions; a
nested phase renames the running one to after-<name> when it returns).

    python benchmarks/results/memory-2026-12-06-phases.py OUT-FOLDER ALGO [WINDOWS]

WINDOWS: that many calibration windows of 128 tokens instead of the default recipe's (a quicker run)."""
import sys, threading, time, os
import onnxq.pipeline as P
from onnxq.recipe import QuantRecipe
peak = {"v": 0, "phase": "start"}
per = {}
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"): return int(line.split()[1]) // 1024
def sampler():
    while True:
        r = rss(); ph = peak["phase"]
        per[ph] = max(per.get(ph, 0), r)
        time.sleep(0.05)
threading.Thread(target=sampler, daemon=True).start()
def wrap(mod, name):
    f = getattr(mod, name)
    def g(*a, **k):
        prev = peak["phase"]; peak["phase"] = name
        try: return f(*a, **k)
        finally: peak["phase"] = prev + "+after-" + name if False else "after-" + name
    setattr(mod, name, g)
import onnxq.solve.loop as L
import onnxq.graph.io as IO
wrap(IO.Weights, "release")
wrap(P, "_check_finite")
wrap(P, "select_layers")
import onnxq.solve.dispatch as D
for n in ["_problem", "_run_solver", "_refine", "layer_loss", "output_bias"]:
    wrap(D, n)
wrap(L, "compact")
for n in ["collect", "solve", "advance_float", "advance", "solve_head", "tune"]:
    wrap(L.BlockLoop, n)
for n in ["_float_build", "_load_float", "_calibration_windows", "_solve", "_write_folder", "_write_file"]:
    wrap(P, n)
out = sys.argv[1]
algo = sys.argv[2] if len(sys.argv) > 2 else "turboboa"
small = dict(calib_windows=int(sys.argv[3]), calib_seq_len=128) if len(sys.argv) > 3 else {}
rep = P.quantize("smollm2", QuantRecipe(algo=algo, **small), out, progress=False)
time.sleep(0.2)
for k, v in per.items(): print(f"{k:30s} {v:6d} MiB")
print("report peak", rep.peak_rss_mb)
