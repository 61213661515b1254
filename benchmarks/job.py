"""One quantization job in its own process (so peak RSS and wall time are its own); prints a JSON line."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def run_onnxq(cfg: dict, model: str, out: str) -> dict:
    """onnxq quantize with the config's recipe fields."""
    from onnxq import QuantRecipe
    from onnxq.pipeline import quantize

    fields = {k: v for k, v in cfg.items() if k in QuantRecipe.__dataclass_fields__}
    rep = quantize(model, QuantRecipe(**fields), out, progress=False)
    return {"calib_tokens": rep.calib_tokens, "calib_seconds": rep.calib_seconds, "solve_seconds": rep.solve_seconds}


def run_ort(cfg: dict, model: str, out: str) -> dict:
    """ONNX Runtime's own MatMulNBitsQuantizer (RTN 'default', 'rtn', 'hqq') on the same float export."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    bits, block, sym = cfg["bits"], cfg["group_size"], cfg["sym"]
    method = cfg["ort_method"]
    if method == "default":
        algo = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=sym, bits=bits)
    elif method == "hqq":
        algo = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    elif method == "rtn":
        algo = mnq.RTNWeightOnlyQuantConfig()
    else:
        raise ValueError(method)
    m = onnx.load(model)
    q = mnq.MatMulNBitsQuantizer(m, bits=bits, block_size=block, is_symmetric=sym, algo_config=algo,
                                 nodes_to_exclude=cfg.get("nodes_to_exclude", []))
    q.process()
    q.model.save_model_to_file(out, use_external_data_format=False)
    return {}


def main() -> None:
    cfg, model, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    t = time.perf_counter()
    extra = (run_ort if cfg.get("tool") == "ort" else run_onnxq)(cfg, model, out)
    result = {"seconds": round(time.perf_counter() - t, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), **extra}
    Path(out).with_suffix(".job.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
