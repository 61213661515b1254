"""Run one model on one ONNX Runtime execution provider: outputs, timings and which provider each node ran on.

Needs only numpy and onnxruntime, so it also runs as a script under another onnxruntime build (the OpenVINO one
lives in its own venv because `onnxruntime-openvino` installs the same `onnxruntime` module):

    python ort_worker.py JOB.json RESULT.npz

JOB: {"model", "providers": [name or [name, {options}]], "inputs": {name: file.npy}, "timing": {name: file.npy},
"outputs": [names] | null, "warmup", "runs", "threads", "config": {session config key: value}}. RESULT.npz holds
the outputs as `out:<name>` arrays and a `meta` JSON string (versions, providers, create/run times in ms, node
placement).
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import onnxruntime as ort


def run(model: str, providers: list, inputs: dict[str, np.ndarray], *, timing: dict[str, np.ndarray] | None = None,
        outputs: list[str] | None = None, warmup: int = 1, runs: int = 3, threads: int | None = None,
        config: dict[str, str] | None = None) -> dict:
    """Create a session on `providers` (with session `config` entries), run `inputs` once (outputs kept), then time
    `runs` runs of `inputs` and of `timing` (a second feed, e.g. one token). Placement comes from ORT's graph
    assignment record, node by node."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
    names_asked = [p if isinstance(p, str) else p[0] for p in providers]
    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(names_asked) and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # the CUDA/cuDNN libraries pip installed, as onnxruntime-gpu asks
    t0 = time.perf_counter()
    session = ort.InferenceSession(model, options, providers=[p if isinstance(p, str) else tuple(p) for p in providers])
    create_ms = (time.perf_counter() - t0) * 1e3
    names = outputs or [o.name for o in session.get_outputs()]
    t1 = time.perf_counter()
    result = session.run(names, inputs)
    first_ms = (time.perf_counter() - t1) * 1e3
    run_ms = _time(session, inputs, warmup, runs)
    token_ms = _time(session, timing, warmup, runs) if timing else []
    placement = {}
    for sub in session.get_provider_graph_assignment_info():
        for node in sub.get_nodes():
            placement[node.name] = [node.op_type, sub.ep_name]
    meta = {"ort_version": ort.__version__, "providers": session.get_providers(), "create_ms": create_ms,
            "first_ms": first_ms, "run_ms": run_ms, "token_ms": token_ms, "placement": placement}
    return {"outputs": dict(zip(names, result)), "meta": meta}


def _time(session: ort.InferenceSession, feeds: dict[str, np.ndarray], warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def main(argv: list[str]) -> int:
    """Script entry: read JOB.json, write RESULT.npz; errors go to stderr as one line, exit 1."""
    job_path, result_path = argv
    with open(job_path) as f:
        job = json.load(f)
    try:
        load = lambda spec: {k: np.load(v) for k, v in (spec or {}).items()}  # noqa: E731
        out = run(job["model"], job["providers"], load(job["inputs"]), timing=load(job.get("timing")) or None,
                  outputs=job.get("outputs"), warmup=job.get("warmup", 1), runs=job.get("runs", 3),
                  threads=job.get("threads"), config=job.get("config"))
    except Exception as err:  # noqa: BLE001 - reported to the parent process as one line
        print(f"{type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    arrays = {f"out:{k}": v for k, v in out["outputs"].items()}
    np.savez(result_path, meta=np.array(json.dumps(out["meta"])), **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
