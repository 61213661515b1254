"""One quantization job in its own process (so peak RSS and wall time are its own).

    python -m benchmarks.job CONFIG_JSON MODEL OUT

Writes OUT's sibling `<stem>.job.json`: {"seconds", "peak_rss_mb", ...} on success, or {"error": "<Type>: <first
line of the exception>"} on failure (exit status 1). A config may carry `calib_npy` (a saved [n, seq_len] int64
array): onnxq and ORT's GPTQ then calibrate on exactly those token windows.

After a successful run the output is checked against the request with `onnxq.inspect` (outside the timed part): a
peer that silently wrote another bit width or block size, or left every layer float (ORT's RTN/k-quant/GPTQ
fall back to fake-quantized float weights for widths they cannot pack), fails the job with a `NotHonored` error.
"""
from __future__ import annotations

import json
import re
import resource
import sys
import time
from pathlib import Path

from onnxq.graph.io import sibling_path

import numpy as np


class NotHonored(RuntimeError):
    """The tool finished but its output does not hold the requested quantization."""


class Unsupported(RuntimeError):
    """The tool has no code path for the requested setting (known from its source; not run)."""


def first_line(err: BaseException) -> str:
    """`Type: first non-empty line of the message` (just the type for an empty message)."""
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    return f"{type(err).__name__}: {lines[0]}"[:300] if lines else type(err).__name__


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent's memory at fork/exec, so a child
    of a large process (the benchmark runner holding an evaluation session) would report the parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _windows(cfg: dict) -> np.ndarray | None:
    return np.load(cfg["calib_npy"]) if cfg.get("calib_npy") else None


def run_onnxq(cfg: dict, model: str, out: str) -> dict:
    """onnxq quantize with the config's recipe fields."""
    from onnxq import QuantRecipe
    from onnxq.pipeline import quantize

    fields = {k: v for k, v in cfg.items() if k in QuantRecipe.__dataclass_fields__}
    windows = _windows(cfg)
    if windows is not None:
        n, seq = windows.shape
        if fields.get("calib_windows", n) != n or fields.get("calib_seq_len", seq) != seq:
            windows = None  # the config asks for other calibration than the shared windows: the pipeline tokenizes
        else:  # keep the recipe's record of the calibration consistent with the windows given
            fields.update(calib_windows=int(n), calib_seq_len=int(seq))
    rep = quantize(model, QuantRecipe(**fields), out, progress=False, windows=windows, ep=cfg.get("ep", "cpu"))
    return {"calib_tokens": rep.calib_tokens, "calib_seconds": rep.calib_seconds, "solve_seconds": rep.solve_seconds,
            "helper_rss_mb": rep.helper_rss_mb}


class _Arg:
    """Enough of an onnxruntime NodeArg for `onnxq.runtime.session.model_feeds` (name, type, shape)."""

    _TYPES = {1: "tensor(float)", 6: "tensor(int32)", 7: "tensor(int64)", 10: "tensor(float16)"}

    def __init__(self, vi):
        t = vi.type.tensor_type
        self.name, self.type = vi.name, self._TYPES.get(t.elem_type, f"elem_type {t.elem_type}")
        self.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


class _Inputs:
    def __init__(self, graph):
        self._args = [_Arg(vi) for vi in graph.input]

    def get_inputs(self):
        return self._args


def calibration_reader(model_proto, windows: np.ndarray):
    """An ORT CalibrationDataReader yielding one window per call (batch 1), fed like onnxq feeds its models."""
    from onnxruntime.quantization import CalibrationDataReader

    from onnxq.runtime.session import model_feeds

    inits = {t.name for t in model_proto.graph.initializer}
    graph_inputs = _Inputs(model_proto.graph)
    graph_inputs._args = [a for a in graph_inputs._args if a.name not in inits]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = [model_feeds(graph_inputs, w[None]) for w in windows]
            self.pos = 0

        def get_next(self):
            if self.pos >= len(self.feeds):
                return None
            self.pos += 1
            return self.feeds[self.pos - 1]

        def rewind(self):
            self.pos = 0

    return Reader()


def ort_support(cfg: dict) -> str | None:
    """Why ORT's quantizer has no code path for this setting (read from its 1.32 source), or None to run it."""
    method, bits = cfg["ort_method"], cfg["bits"]
    if method == "gptq" and bits != 4:
        return ("ORT GPTQ packs MatMulNBits only for 4 bits (neural_compressor gptq_quantize: num_bits == 4); "
                "other widths stay fake-quantized fp32")
    if method == "gptq" and cfg["group_size"] == -1:
        return "ORT GPTQ per-channel writes block_size = K, which MatMulNBits rejects unless K is a power of two"
    return None


def _lm_head_nodes(model_proto) -> list[str]:
    """Node names of linear layers that onnxq leaves float by default (its `exclude=['lm_head']`)."""
    return [n.name for n in model_proto.graph.node if n.op_type in ("MatMul", "Gemm") and re.search("lm_head", n.name)]


def run_ort(cfg: dict, model: str, out: str) -> dict:
    """ONNX Runtime's own MatMulNBitsQuantizer on the same float export.

    ort_method: default (MLAS RTN), rtn / k_quant (INC code, take no bit width or block size of their own: the
    block comes from the quantizer's block_size and the width from customized_weight_config), hqq, gptq (INC GPTQ
    on a CalibrationDataReader over `calib_npy`). `quant_format: "qdq"` asks for DequantizeLinear→MatMul (default
    only). `exclude_lm_head` (default True) leaves lm_head float as onnxq does.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    reason = ort_support(cfg)
    if reason:
        raise Unsupported(reason)
    bits, block, sym = cfg["bits"], cfg["group_size"], cfg["sym"]
    method = cfg["ort_method"]
    fmt = QuantFormat.QDQ if cfg.get("quant_format") == "qdq" else QuantFormat.QOperator
    acc = cfg.get("accuracy_level")
    m = onnx.load(model)
    exclude = list(cfg.get("nodes_to_exclude", [])) + (_lm_head_nodes(m) if cfg.get("exclude_lm_head", True) else [])
    # per-node override for the INC paths (RTN/k-quant/GPTQ hard-code 4 bits otherwise)
    per_node = {n.name: {"bits": bits, "group_size": block, "scheme": "sym" if sym else "asym"}
                for n in m.graph.node if n.op_type == "MatMul" and n.name not in exclude}
    if method == "default":
        algo = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=sym, bits=bits, accuracy_level=acc,
                                                quant_format=fmt)
    elif method == "hqq":
        algo = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits, quant_format=fmt)
    elif method == "rtn":
        algo = mnq.RTNWeightOnlyQuantConfig(quant_format=fmt, customized_weight_config=per_node)
    elif method == "k_quant":
        algo = mnq.KQuantWeightOnlyQuantConfig(quant_format=fmt, customized_weight_config=per_node)
    elif method == "gptq":
        windows = _windows(cfg)
        if windows is None:
            raise ValueError("ORT GPTQ needs calibration windows: give calib_npy")
        algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=calibration_reader(m, windows), quant_format=fmt)
    else:
        raise ValueError(f"unknown ORT method {method!r}: use default, rtn, k_quant, hqq or gptq")
    q = mnq.MatMulNBitsQuantizer(m, bits=bits, block_size=block, is_symmetric=sym, accuracy_level=acc,
                                 algo_config=algo, nodes_to_exclude=exclude)
    if method == "gptq" and exclude:  # ORT's GPTQ path ignores nodes_to_exclude (only its RTN path marks them fp32)
        make_config = q._generate_q4_node_config
        q._generate_q4_node_config = lambda: {**make_config(), **{n: "fp32" for n in exclude}}
    q.process()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    q.model.save_model_to_file(out, use_external_data_format=False)
    extra = {"excluded": exclude}
    if method == "gptq":
        extra["calib_tokens"] = int(windows.size)
    return extra


def check_output(cfg: dict, out: str) -> dict:
    """What the file holds; raise NotHonored if it is not the requested quantization."""
    from onnxq.inspect import inspect_model

    info = inspect_model(out)
    quant = [l for l in info["layers"] if l["format"] != "float"]
    want_bits = 4 if cfg["bits"] == 3 else cfg["bits"]  # 3-bit grids live in 4-bit containers
    asked = f"W{cfg['bits']} {'per-channel' if cfg['group_size'] == -1 else 'g%d' % cfg['group_size']}"
    if not quant:
        raise NotHonored(f"asked {asked}, but no layer in the output is quantized (fake-quantized fp32 weights)")
    wrong_bits = sorted({l["bits"] for l in quant if l["bits"] != want_bits})
    if wrong_bits:
        raise NotHonored(f"asked {asked}, but layers hold {'/'.join(map(str, wrong_bits))}-bit weights")
    if cfg["group_size"] != -1:
        wrong_block = sorted({l["block_size"] for l in quant if l["block_size"] != cfg["group_size"]})
        if wrong_block:
            raise NotHonored(f"asked {asked}, but layers use block size {'/'.join(map(str, wrong_block))}")
    return {"quantized_layers": len(quant), "float_layers": len(info["layers"]) - len(quant)}


def main() -> None:
    cfg, model, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    result_path = sibling_path(out, ".job.json", (".onnx",))
    result_path.unlink(missing_ok=True)
    try:
        t = time.perf_counter()
        extra = (run_ort if cfg.get("tool") == "ort" else run_onnxq)(cfg, model, out)
        result = {"seconds": round(time.perf_counter() - t, 2),
                  "peak_rss_mb": round(peak_rss_mb(), 1), **extra}
        result.update(check_output(cfg, out))
    except Exception as err:  # the row reports it; the traceback goes to stderr for whoever looks
        import traceback

        traceback.print_exc()
        result_path.write_text(json.dumps({"error": first_line(err), "unsupported": isinstance(err, Unsupported)}))
        print(first_line(err), file=sys.stderr)
        sys.exit(1)
    result_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
