"""Side-by-side benchmark: onnxq solvers vs ONNX Runtime's quantizer on the same model, text and machine.

    python -m benchmarks.run --suite quick [--update-table]      # every setting, ORT without GPTQ (hours on 2 cores)
    python -m benchmarks.run --suite full                         # + all onnxq solvers everywhere, ORT GPTQ (~30 min each)
    python -m benchmarks.run --suite smoke                        # tiny random Llama built in code, seconds (CI)
    python -m benchmarks.run --suite cuda --ep cuda               # on a GPU: the 4/8-bit rows the CUDA EP runs
    python -m benchmarks.run --suite issue2 | issue3              # the earlier issue suites (no latency)

Every quantization runs in its own process (`benchmarks.job`: its wall time and peak RSS are its own; a crash or a
refusal becomes the row's error, first line of the exception). Every model is then scored here by the same code:
perplexity on the same windows (`onnxq.runtime.evaluate.perplexity`), bits per weight with scales and zero points
(`onnxq.inspect`), file size, and, for suites with latency, prefill/decode speed on the with-past export into which
the quantized layers are moved (`benchmarks.latency`). Results: benchmarks/results/<date>-<suite>.{md,json,png};
--update-table also rewrites benchmarks/results/table.md, the full table the top-level README links to.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from onnxq.graph.io import sibling_path
from onnxq.report import report_file

import numpy as np

from benchmarks.job import first_line

W = dict(sym=False, format="nbits")
# bits, group size (-1 = per channel): the settings of issue 8
SETTINGS = [(8, 128), (4, 32), (4, 64), (4, 128), (3, 128), (2, 64), (2, -1)]
SCORE_GUESS = 180.0  # seconds to score a full-suite row (PPL, latency, variants) where a results file has no record
ORT_FAST = ("default", "rtn", "k_quant", "hqq")  # data-free, seconds to minutes
ONNXQ = [dict(algo="rtn"), dict(algo="gptq"), dict(algo="boa"), dict(algo="turboboa"), dict(algo="gptq", refine_scales=True)]


def _onnxq(algo: dict, bits: int, group: int, **kw) -> dict:
    return dict(tool="onnxq", **algo, bits=bits, group_size=group, **{**W, **kw})


def _ort(method: str, bits: int, group: int, **kw) -> dict:
    return dict(tool="ort", ort_method=method, bits=bits, group_size=group, sym=False, exclude_lm_head=True, **kw)


def _matrix(onnxq_everywhere: list[dict], onnxq_w4_w2: list[dict], ort_methods: tuple[str, ...]) -> list[dict]:
    """Per setting: onnxq solvers (some only at W4 g128 / W2 g64; float zero points: RTN at 2-4 bits, TurboBoA at
    W4 g128 / W2 g64), then the ORT methods; then the QDQ forms."""
    rows = []
    for b, g in SETTINGS:
        rows += [_onnxq(a, b, g) for a in onnxq_everywhere]
        if (b, g) in ((4, 128), (2, 64)):
            rows += [_onnxq(a, b, g) for a in onnxq_w4_w2]
        if b != 8:  # ORT has no 8-bit MatMulNBits kernel with float zero points
            rows += [_onnxq(dict(algo="rtn"), b, g, float_zero=True)]
        if (b, g) in ((4, 128), (2, 64)):
            rows += [_onnxq(dict(algo="turboboa"), b, g, float_zero=True)]
        rows += [_ort(m, b, g) for m in ort_methods]
    rows += [_onnxq(dict(algo="gptq"), 4, 128, format="qdq"), _ort("default", 4, 128, quant_format="qdq")]
    return rows


SUITES: dict[str, list[dict]] = {
    "smoke": [
        dict(tool="onnxq", algo="rtn", bits=4, group_size=32, **W),
        _ort("default", 4, 32),
        _ort("default", 3, 32),  # ORT refuses: the row must carry the error's first line
        _ort("gptq", 2, 32),  # known from ORT's source to have no 2-bit path: not run
    ],
    "issue2": [
        dict(tool="ort", ort_method="default", bits=4, group_size=128, sym=False),
        dict(tool="ort", ort_method="hqq", bits=4, group_size=128, sym=False),
        dict(tool="onnxq", algo="rtn", bits=4, group_size=128, **W),
        dict(tool="onnxq", algo="gptq", bits=4, group_size=128, **W),
        dict(tool="onnxq", algo="gptq", bits=3, group_size=128, sym=False, format="qdq"),
        dict(tool="onnxq", algo="gptq", bits=2, group_size=64, **W),
    ],
    "issue3": [
        dict(tool="onnxq", algo=a, bits=b, group_size=g, **({**W, "format": "qdq"} if b == 3 else W))
        for b, g in ((3, 128), (2, 64), (2, -1))
        for a in ("rtn", "gptq", "boa", "turboboa")
    ]
    + [dict(tool="onnxq", algo="turboboa", bits=4, group_size=128, **W)],
    # issues23: the rows issues 2 and 3 ask for, fastest first, in one run
    "issues23": [
        _ort("default", 4, 128), _ort("hqq", 4, 128),
        _onnxq(dict(algo="rtn"), 4, 128), _onnxq(dict(algo="gptq"), 4, 128), _onnxq(dict(algo="turboboa"), 4, 128),
    ]
    + [
        _onnxq(dict(algo=a), b, g, **({"format": "qdq"} if b == 3 else {}))
        for a in ("rtn", "gptq", "turboboa", "boa")
        for b, g in ((3, 128), (2, 64), (2, -1))
    ],
    # quick: rtn and gptq at every setting, the attention-aware solvers and gso where they matter, ORT without GPTQ
    "quick": _matrix(ONNXQ[:2], ONNXQ[2:], ORT_FAST),
    # full: every onnxq solver at every setting, and ORT's GPTQ (about 30 min per run on SmolLM2, 2 cores)
    "full": _matrix(ONNXQ, [], ORT_FAST + ("gptq",)),
    # aespa: the layer-wise attention-aware solver beside GPTQ, BoA and TurboBoA, same calibration (issue 32)
    "aespa": [_onnxq(dict(algo=a), b, g) for b, g in ((4, 128), (3, 128), (2, 64)) for a in ("gptq", "aespa", "boa", "turboboa")],
    # cuda: what the CUDA EP runs (4 and 8 bits), fastest first, for a GPU lease measured in minutes
    "cuda": [_ort("default", 4, 128), _onnxq(dict(algo="rtn"), 4, 128), _onnxq(dict(algo="gptq"), 4, 128),
             _onnxq(dict(algo="turboboa"), 4, 128), _onnxq(dict(algo="gptq"), 4, 128, format="qdq"),
             _ort("default", 4, 128, quant_format="qdq"), _ort("hqq", 4, 128), _onnxq(dict(algo="boa"), 4, 128),
             _onnxq(dict(algo="rtn"), 8, 128), _ort("default", 8, 128), _onnxq(dict(algo="turboboa"), 4, 32)],
}

# Per-suite options; suites not listed run without latency on the default model (as issue2/issue3 always did).
LATENCY = dict(prefill=512, context=128, decode=32, warmup=1, repeats=5)
OPTIONS: dict[str, dict] = {
    "smoke": dict(model="tiny", latency=dict(prefill=32, context=16, decode=8, warmup=1, repeats=3),
                  eval_seq=32, eval_windows=4, calib_seq=32, calib_windows=8,
                  variants=["onnxq:rtn W4 g32 asym", "ort:default W4 g32 asym"]),
    "quick": dict(latency=LATENCY, variants=["onnxq:gptq W4 g128 asym", "onnxq:gptq W4 g128 asym qdq",
                                             "ort:default W4 g128 asym", "ort:default W4 g128 asym qdq"]),
    "full": dict(latency=LATENCY, variants=["onnxq:gptq W4 g128 asym", "onnxq:gptq W4 g128 asym qdq",
                                            "ort:default W4 g128 asym", "ort:default W4 g128 asym qdq"]),
    "cuda": dict(latency=LATENCY),
}
DEFAULTS = dict(model="smollm2", latency=None, eval_seq=512, eval_windows=8, calib_seq=512, calib_windows=16, variants=[])
TABLE = Path(__file__).resolve().parent / "results" / "table.md"  # the generated full table the README links to
QDQ_FUSION = "QDQSelectorActionTransformer"  # ORT's DQ -> MatMul => MatMulNBits rewrite (tests/test_targets.py)


def group_name(group_size: int) -> str:
    """'pc' for per-channel (-1), else 'g<size>'."""
    return "pc" if group_size == -1 else f"g{group_size}"


def label(cfg: dict) -> str:
    """Row label: tool/algorithm and setting (QDQ outputs end in ' qdq')."""
    algo = cfg.get("ort_method") or cfg.get("algo")
    g = group_name(cfg["group_size"])
    extra = "+gso" if cfg.get("refine_scales") else ""
    qdq = " qdq" if "qdq" in (cfg.get("format"), cfg.get("quant_format")) else ""
    grid = "sym" if cfg["sym"] else "asym float-zp" if cfg.get("float_zero") else "asym"
    return f"{cfg['tool']}:{algo}{extra} W{cfg['bits']} {g} {grid}{qdq}"


def versions() -> dict:
    """Versions of the parts that decide the numbers."""
    import onnx
    import onnxruntime
    import torch

    import onnxq

    out = {"onnxq": onnxq.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
           "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}
    try:
        import matplotlib

        out["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    return out


def cpu_name(clock: bool = False) -> str:
    """CPU model with its widest vector extensions (and clock): same-named cloud CPUs differ, and numbers move between
    machines with and without AVX-512."""
    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"^model name\s*:\s*(.+)$", info, re.M).group(1).strip()
        flags = set(re.search(r"^flags\s*:\s*(.+)$", info, re.M).group(1).split())
        isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
        mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M) if clock else None
        cpu += f" [{' '.join(isa) or 'no avx2'}{f', {float(mhz.group(1)):.0f} MHz' if mhz else ''}]"
    except (OSError, AttributeError):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def machine(ep: str) -> str:
    """CPU (model, vector extensions, clock), cores, memory, execution provider and the load when the run started."""
    cpu = cpu_name(clock=True)
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    load = ", load average %.1f at start" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return f"{cpu} ({platform.machine()}){mem}, {platform.system()}{gpu_name()}; EP {ep}{load}"


def gpu_name() -> str:
    """', GPU <name>' when torch sees a CUDA device, else ''."""
    import torch

    return f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""


class CpuShare:
    """What other processes did to the CPUs while a row ran: busy and stolen CPU time not spent by this process or its
    children, as a share of all cores over the row's wall time (Linux /proc/stat; None elsewhere)."""

    BUSY = (0, 1, 2, 5, 6)  # user nice system irq softirq (guest time is inside user)
    STEAL = 7

    def __init__(self):
        self.start = self._now()

    @staticmethod
    def _now() -> tuple | None:
        import resource
        import time

        try:
            ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        own = sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
                  for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        return time.monotonic(), ticks, own

    def shares(self) -> dict:
        """{"other_cpu": share, "steal": share} since construction (empty where /proc/stat is missing)."""
        end = self._now()
        if self.start is None or end is None:
            return {}
        (t0, a, own0), (t1, b, own1) = self.start, end
        hz, cap = os.sysconf("SC_CLK_TCK"), max(t1 - t0, 1e-9) * (os.cpu_count() or 1)
        busy = sum(b[i] - a[i] for i in self.BUSY) / hz
        steal = (b[self.STEAL] - a[self.STEAL]) / hz if len(b) > self.STEAL else 0.0
        return {"other_cpu": round(max(busy - (own1 - own0), 0.0) / cap, 3), "steal": round(steal / cap, 3)}


BUSY_SHARE = 0.10  # a row during which other processes or the hypervisor took more of the CPUs has unclean times


def busy(row: dict) -> bool:
    """Whether other processes (or steal) took a share of the CPUs during the row that makes its times unclean."""
    share = row.get("cpu_share") or {}
    return share.get("other_cpu", 0.0) + share.get("steal", 0.0) > BUSY_SHARE


# ---- models and token windows ------------------------------------------------------------------------------------


class ByteTokens:
    """UTF-8 bytes as token ids: real text for the tiny 256-token models of the smoke suite (no tokenizer)."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": list(text.encode("utf-8"))}


def tiny_models(work: Path) -> tuple[Path, Path]:
    """The smoke suite's model: `tests.tiny.tiny_llama()` (random, vocab 256) exported without and with past."""
    from onnxq.models.export import export_onnx
    from tests.tiny import tiny_llama

    hf = work / "tiny-llama-hf"
    if not (hf / "config.json").is_file():
        tiny_llama().save_pretrained(hf)
    return export_onnx(hf, work / "tiny-llama"), export_onnx(hf, work / "tiny-llama-past", with_past=True)


def models(opts: dict, args, work: Path):
    """(float no-past model, float with-past model or None, tokenizer)."""
    from onnxq.models.export import export_onnx, load_tokenizer, resolve_model

    if opts["model"] == "tiny":
        plain, past = tiny_models(work)
        return plain, past, ByteTokens()
    model = resolve_model(args.model)
    past = None
    if opts["latency"]:
        if args.past_model:
            past = Path(args.past_model)
        elif not Path(args.model).suffix and not Path(args.model).is_dir():  # a registry name: export with past
            past = export_onnx(args.model, with_past=True)
    return model, past, load_tokenizer(model)


def weight_stats(path: Path) -> dict:
    """Bits per weight of the quantized layers (scales, zero points and padding included) and of all weights."""
    from onnxq.inspect import inspect_model

    info = inspect_model(path)
    layers = list({l["weight"]: l for l in info["layers"]}.values())  # a tied weight counts once
    quant = [l for l in layers if l["format"] != "float"]
    params_q = sum(l["k"] * l["n"] for l in quant)
    params = sum(l["k"] * l["n"] for l in layers)
    return {
        "bpw": round(sum(l["bytes"] for l in quant) * 8 / params_q, 3) if params_q else 32.0,
        "bpw_all_weights": round(sum(l["bytes"] for l in layers) * 8 / params, 3) if params else None,
        "quantized_params": params_q,
        "quantized_share": round(params_q / params, 4) if params else 0.0,
        "formats": sorted({l["format"] for l in quant}),
        "accuracy_level": sorted({l["accuracy_level"] or 0 for l in quant if l["format"] == "MatMulNBits"}),
    }


# ---- the run -----------------------------------------------------------------------------------------------------


def run_job(cfg: dict, model: Path, out: Path, *, calib_npy: Path, ep: str, device: str = "cpu") -> dict:
    """Quantize in a child process; returns the job's JSON ({"error": ...} on failure). `device`: onnxq's solvers."""
    job_cfg = {**cfg, "calib_npy": str(calib_npy), "ep": ep, **({"device": device} if cfg["tool"] == "onnxq" else {})}
    result = sibling_path(out, ".job.json", (".onnx",))
    result.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.job", json.dumps(job_cfg), str(model), str(out)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if result.is_file():
        job = json.loads(result.read_text())
        if proc.returncode == 0 or "error" in job:
            return job
    if proc.returncode < 0:
        return {"error": f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")}
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    return {"error": (lines or [f"exit status {proc.returncode}"])[-1][:300]}


def file_digest(path: Path) -> str:
    """sha256 of a model file and of its external-data siblings (`<name>.data`, `<name>_data`, ...)."""
    h = hashlib.sha256()
    for f in sorted([path, *(p for p in path.parent.glob(path.name + "?*") if not p.name.endswith(".json"))]):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def repeat_job(cfg: dict, model: Path, out: Path, first: dict, n: int, **kw) -> dict:
    """Run the job n - 1 more times (same file name, a sibling folder) and return the timing fields over the runs:
    median wall time and peak RSS, every run's values, and whether every repeat wrote the same bytes."""
    again = out.parent / "repeat" / out.name
    again.parent.mkdir(exist_ok=True)
    want, runs, extra = file_digest(out), [first], {"repeats_identical": True}
    for _ in range(n - 1):
        job = run_job(cfg, model, again, **kw)
        if "error" in job:
            extra = {"repeat_error": job["error"]}
            break
        runs.append(job)
        extra["repeats_identical"] &= file_digest(again) == want
    _drop(again)
    med = lambda k: round(float(np.median([r[k] for r in runs])), 2)  # noqa: E731
    return {"seconds": med("seconds"), "peak_rss_mb": med("peak_rss_mb"), "seconds_runs": [r["seconds"] for r in runs],
            "peak_rss_mb_runs": [r["peak_rss_mb"] for r in runs], **extra}


def score(row: dict, path: Path, windows: np.ndarray, ep: str) -> None:
    """PPL, size and bits per weight of a model file, into `row`; off the CPU EP, also the CPU EP's PPL of the same
    file (the two EPs must agree)."""
    from onnxq.runtime.evaluate import file_size, perplexity

    row["ppl"] = round(perplexity(path, windows, ep), 3)
    if ep != "cpu":
        row["ppl_cpu_ep"] = round(perplexity(path, windows, "cpu"), 3)
    row["size_mb"] = round(file_size(path) / 2**20, 2)
    row.update(weight_stats(path))


def latency_of(row: dict, quant: Path | None, past: Path, lat: dict, ep: str, threads, tokens, keep: bool) -> None:
    """Latency of `quant` moved into the with-past export (or of `past` itself for the float row), into `row`."""
    from benchmarks import latency as L

    target = past if quant is None else quant.with_name(quant.stem + "-past.onnx")
    try:
        if quant is not None:
            row["transplant"] = L.transplant(quant, past, target)
            row["transplant_rel_l2"] = L.check_transplant(quant, target, tokens[None, :16], ep=ep)
        row["latency"] = L.measure(target, ep=ep, threads=threads, tokens=tokens, **lat)
    except Exception as err:  # a latency failure must not lose the row's other numbers
        row["latency_error"] = first_line(err)
    finally:
        if quant is not None and not keep:
            _drop(target)


def _drop(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


def variants(row: dict, quant: Path, past: Path, windows: np.ndarray, lat: dict, ep: str, threads, tokens) -> list[dict]:
    """The same quantized weights run differently: MatMulNBits accuracy_level 0 vs 4; QDQ with ORT's
    DQ→MatMulNBits fusion (default) vs without it."""
    from benchmarks import latency as L
    from onnxq.runtime.evaluate import perplexity

    out = []
    moved = quant.with_name(quant.stem + "-past.onnx")
    try:
        L.transplant(quant, past, moved)
        if "MatMulNBits" in row.get("formats", []):
            for level in (0, 4):
                v = {"label": row["label"], "form": f"MatMulNBits, accuracy_level {level}"}
                q_acc = quant.with_name(f"{quant.stem}-acc{level}.onnx")
                p_acc = quant.with_name(f"{quant.stem}-acc{level}-past.onnx")
                L.restamp(quant, q_acc, level)
                L.restamp(moved, p_acc, level)
                v["ppl"] = round(perplexity(q_acc, windows, ep), 3)
                v["latency"] = L.measure(p_acc, ep=ep, threads=threads, tokens=tokens, **lat)
                _drop(q_acc)
                _drop(p_acc)
                out.append(v)
        elif "DQ→MatMul" in row.get("formats", []):
            for name, off in (("DQ→MatMul, fused to MatMulNBits by ORT (default: int8 activations)", None),
                              ("DQ→MatMul, fusion off (QDQSelectorActionTransformer disabled)", [QDQ_FUSION])):
                v = {"label": row["label"], "form": name,
                     "ppl": row["ppl"] if off is None else round(perplexity(quant, windows, ep, disabled_optimizers=off), 3)}
                v["latency"] = L.measure(moved, ep=ep, threads=threads, tokens=tokens, disabled_optimizers=off, **lat)
                out.append(v)
    except Exception as err:
        out.append({"label": row["label"], "form": "failed", "error": first_line(err)})
    finally:
        _drop(moved)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="issue2", choices=sorted(SUITES))
    ap.add_argument("--model", default="smollm2", help="registry name, .onnx file or HF folder (smoke: built in code)")
    ap.add_argument("--past-model", help="float export with past of the same model, for latency (a registry model "
                    "is exported with past automatically)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--work", default=os.environ.get("ONNXQ_BENCH_WORK", "/tmp/onnxq-bench"))
    ap.add_argument("--only", default="", help="run only rows whose label contains this (or one of these, comma-separated)")
    ap.add_argument("--skip", default="", help="skip rows whose label contains this (or one of these, comma-separated)")
    ap.add_argument("--ep", default="cpu", help="execution provider for calibration, perplexity and latency (cpu, "
                    "cuda); off the CPU, each file's perplexity is also measured on the CPU EP")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="torch device of onnxq's solvers (default: cuda with "
                    "--ep cuda, else cpu)")
    ap.add_argument("--threads", type=int, help="ORT intra-op threads for latency (default: ORT's choice)")
    ap.add_argument("--latency", action=argparse.BooleanOptionalAction, default=None,
                    help="measure latency (default: on for smoke/quick/full)")
    ap.add_argument("--repeats", type=int, help="latency repeats (default 5; smoke 3)")
    ap.add_argument("--quant-repeats", type=int, default=1, metavar="N", help="run each quantization N times, each "
                    "in a fresh process: the table quotes the median wall time and peak RSS [min–max], the JSON keeps "
                    "every run, and every repeat must write a byte-identical file (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the with-past copies of the quantized models")
    ap.add_argument("--resume", nargs="?", const="", metavar="JSON", help="finish a run that was cut short: keep "
                    "the rows of its results JSON (default: today's file of this suite), run only the missing ones, "
                    "and write the result under that file's name")
    ap.add_argument("--rerun-busy", action="store_true", help="with --resume: also rerun the rows during which other "
                    f"processes took more than {BUSY_SHARE * 100:.0f}%% of the CPUs, and those measured on another CPU")
    ap.add_argument("--stop-by", metavar="WHEN", help="start no row that would end after WHEN (HH:MM, its next "
                    "occurrence, or an ISO date and time): a row is left for --resume once WHEN has passed, or when "
                    "its time in --estimate-from says it would not finish by then")
    ap.add_argument("--estimate-from", metavar="JSON", help="with --stop-by: an earlier results file whose rows' "
                    "times estimate each row's (quantization time × --quant-repeats + its scoring time)")
    ap.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write <stem>.png")
    ap.add_argument("--update-table", "--update-readme", dest="update_table", action="store_true",
                    help="rewrite benchmarks/results/table.md (the full table the README links to) from this run")
    ap.add_argument("--render", metavar="JSON", help="run nothing: rewrite the .md (and .png, table.md with "
                    "--update-table) of an existing results file")
    ap.add_argument("--table", default=str(TABLE), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from onnxq.errors import OnnxqError
    from onnxq.runtime.session import providers_for

    args.device = args.device or default_device(args.ep)
    if args.quant_repeats < 1:
        print("error: --quant-repeats must be >= 1", file=sys.stderr)
        return 2
    if args.render:
        return render(Path(args.render), plot_it=args.plot, table=Path(args.table) if args.update_table else None)
    try:
        providers_for(args.ep)  # fail here, in one line, before any work
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise OnnxqError("--device cuda: this torch sees no CUDA device (install a CUDA build of torch, or "
                                 "give --device cpu)")
        args.stop_by = deadline(args.stop_by) if args.stop_by else None
        if args.estimate_from and not args.stop_by:
            raise OnnxqError("--estimate-from only estimates rows for --stop-by: give --stop-by WHEN too")
        args.estimates = row_estimates(args.estimate_from, args.quant_repeats)
        if args.resume and not Path(args.resume).is_file():
            raise OnnxqError(f"--resume {args.resume}: no such results file (give a <date>-<suite>.json, or no value "
                             "for today's file of the suite)")
        today = Path(args.out) / f"{dt.date.today().isoformat()}-{args.suite}"
        args.stem = sibling_path(args.resume, "", (".json",)) if args.resume else today
        resumed = report_file(args.stem, ".json")
        args.resumed = load_results(resumed, "--resume") if args.resume is not None and resumed.is_file() else None
        timed = args.resumed["header"].get("quant_repeats", 1) if args.resumed else args.quant_repeats
        if timed != args.quant_repeats:
            raise OnnxqError(f"--resume {resumed}: its rows time each quantization over {timed} run(s): give "
                             f"--quant-repeats {timed} to finish it")
    except OnnxqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except OnnxqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def deadline(when: str) -> dt.datetime:
    """--stop-by: HH:MM is its next occurrence (local time); anything else must be an ISO date and time."""
    from onnxq.errors import OnnxqError

    now = dt.datetime.now()
    try:
        if re.fullmatch(r"\d{1,2}:\d{2}", when):
            t = dt.datetime.combine(now.date(), dt.time.fromisoformat(when.zfill(5)))
            return t if t > now else t + dt.timedelta(days=1)
        return dt.datetime.fromisoformat(when)
    except ValueError as err:
        raise OnnxqError(f"--stop-by {when}: not a time ({err}); give HH:MM or an ISO date and time") from None


def row_estimates(path: str | None, repeats: int) -> dict[str, float]:
    """Seconds a row is expected to take, by label, from an earlier results file: its quantization time × `repeats`
    plus its scoring time (SCORE_GUESS where the file did not record one)."""
    if not path:
        return {}
    rows = load_results(Path(path), "--estimate-from")["rows"]
    return {r["label"]: (r.get("seconds") or 0.0) * repeats + r.get("score_seconds", SCORE_GUESS) for r in rows}


def load_results(path: Path, option: str) -> dict:
    """A results JSON of benchmarks.run (header, rows, variants); anything else is a one-line error naming `option`."""
    from onnxq.errors import OnnxqError

    try:
        data = json.loads(path.read_text())
        if missing := {"header", "rows", "variants"} - set(data):
            raise KeyError(f"no {', '.join(sorted(missing))}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise OnnxqError(f"{option} {path}: not a results JSON of benchmarks.run ({first_line(err)}); give a "
                         "<date>-<suite>.json") from None
    return data


def default_device(ep: str) -> str:
    """onnxq's solvers follow the EP: torch cuda with the CUDA EP, else cpu."""
    return "cuda" if ep == "cuda" else "cpu"


def _run(args) -> int:
    from onnxq.calibrate.textdata import load_text, token_windows

    opts = {**DEFAULTS, **OPTIONS.get(args.suite, {})}
    lat = dict(opts["latency"]) if opts["latency"] else None
    if args.latency is False:
        lat = None
    elif args.latency and lat is None:
        lat = dict(LATENCY)
    if lat and args.repeats:
        lat["repeats"] = args.repeats
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, past, tok = models({**opts, "latency": lat}, args, work)
    if lat and past is None:
        print("note: no with-past model (give --past-model): latency is not measured", file=sys.stderr)
        lat = None
    eval_text = load_text("sotu-eval")
    windows = token_windows(tok, eval_text, opts["eval_seq"], opts["eval_windows"])
    calib = token_windows(tok, load_text("sotu-calib"), opts["calib_seq"], opts["calib_windows"], seed=0, random=True)
    calib_npy = work / f"{args.suite}-calib.npy"
    np.save(calib_npy, calib)
    lat_tokens = np.asarray(tok(eval_text[-20000:])["input_ids"], dtype=np.int64)
    stem = args.stem
    head = header(args, opts, lat, model, past, windows, calib)
    cpu = cpu_name()
    done: dict[str, dict] = {}
    before: dict[str, dict] = {}  # every row of the resumed file: written until this run replaces it
    extra: list[dict] = []
    if old := args.resumed:  # a run cut short: keep its rows, run the rest
        head = {**old["header"], "resumed": old["header"].get("resumed", []) + [f"{head['date']} on {cpu}"]}
        before = {r["label"]: r for r in old["rows"]}
        done = {k: r for k, r in before.items() if not (args.rerun_busy and (busy(r) or r.get("cpu", cpu) != cpu))}
        extra = [v for v in old["variants"] if v["label"] in done]
    rows = [done.get("float (fp32 export)") or {"label": "float (fp32 export)", "tool": "float", "cpu": cpu}]
    if "ppl" not in rows[0]:
        share = CpuShare()
        score(rows[0], model, windows, args.ep)
        rows[0]["bpw"] = 32.0
        if lat:
            latency_of(rows[0], None, past, lat, args.ep, args.threads, lat_tokens, args.keep)
        rows[0]["cpu_share"] = share.shares()
    _print(rows[0])
    left = []
    wanted = set(opts["variants"])
    has = lambda name, parts: any(p in name for p in parts.split(",") if p)  # noqa: E731
    picked = lambda name: not ((args.only and not has(name, args.only)) or has(name, args.skip))  # noqa: E731
    order = [rows[0]["label"]] + [label(cfg) for cfg in SUITES[args.suite]]  # the file keeps rows --skip leaves out
    head.setdefault("rows_planned", 1 + sum(picked(name) for name in order[1:]))  # a resumed run keeps its plan
    for i, cfg in enumerate(SUITES[args.suite]):
        name = label(cfg)
        if not picked(name):
            continue
        if name in done:
            rows.append(done[name])
            continue
        if args.stop_by and dt.datetime.now() + dt.timedelta(seconds=args.estimates.get(name, 0.0)) > args.stop_by:
            left.append(name)
            continue
        out = work / f"{args.suite}-{i}.onnx"
        row = {"label": name, **cfg, "cpu": cpu}
        share = CpuShare()
        job = run_job(cfg, model, out, calib_npy=calib_npy, ep=args.ep, device=args.device)
        if "error" not in job and args.quant_repeats > 1:
            job.update(repeat_job(cfg, model, out, job, args.quant_repeats, calib_npy=calib_npy, ep=args.ep,
                                  device=args.device))
        row.update(job)
        scored = time.perf_counter()
        if "error" not in job:
            try:
                score(row, out, windows, args.ep)
            except Exception as err:  # e.g. a file ORT cannot load: the row says so, the suite goes on
                row["error"] = f"evaluation failed: {first_line(err)}"
            if lat and "error" not in row:
                latency_of(row, out, past, lat, args.ep, args.threads, lat_tokens, args.keep)
                if name in wanted:
                    extra += variants(row, out, past, windows, lat, args.ep, args.threads, lat_tokens)
        row["score_seconds"] = round(time.perf_counter() - scored, 1)
        row["cpu_share"] = share.shares()
        rows.append(row)
        _print(row)
        write(stem, head, in_order(rows, before, order), extra)
    write(stem, head, in_order(rows, before, order), extra)
    publish(stem, plot_it=args.plot, table=Path(args.table) if args.update_table else None)
    if left:
        shown = ", ".join(left[:3]) + (", …" if len(left) > 3 else "")
        print(f"--stop-by {args.stop_by:%Y-%m-%d %H:%M}: {len(left)} row(s) not started ({shown}); finish with the "
              f"same command and --resume {report_file(stem, '.json')}")
    return 0


def render(path: Path, *, plot_it: bool, table: Path | None) -> int:
    """Rewrite a results file's Markdown (and plot, table.md) from its JSON alone."""
    from onnxq.errors import OnnxqError

    try:
        data = load_results(path, "--render")
    except OnnxqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    head, rows, extra = data["header"], data["rows"], data["variants"]
    stem = sibling_path(path, "", (".json",))
    write_markdown(stem, head, rows, extra)
    publish(stem, plot_it=plot_it, table=table)
    return 0


def publish(stem: Path, *, plot_it: bool, table: Path | None) -> None:
    """After the results files: the plot from the JSON, and table.md from the JSON's rows and the plot."""
    if plot_it:
        from benchmarks.plot import plot

        plot(report_file(stem, ".json"), report_file(stem, ".png"))
    if table:
        update_table(table, stem)
    print(f"wrote {stem}.md" + (" / .png" if plot_it else "") + (f" and {table}" if table else ""))


def in_order(rows: list[dict], before: dict[str, dict], order: list[str]) -> list[dict]:
    """The rows to write, in suite order: this run's where it has one, else the resumed file's (so a resumed run that
    is cut short again still writes every row it was given)."""
    have = {**before, **{r["label"]: r for r in rows}}
    return [have[name] for name in order if name in have] + [r for name, r in have.items() if name not in order]


def header(args, opts, lat, model, past, windows, calib) -> dict:
    """The facts a reader needs to reproduce or discount the numbers."""
    argv = ["--suite", args.suite] + sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in (
        ("model", args.model if args.model != "smollm2" else None), ("only", args.only or None),
        ("skip", args.skip or None), ("ep", args.ep if args.ep != "cpu" else None),
        ("device", args.device if args.device != default_device(args.ep) else None), ("threads", args.threads),
        ("repeats", args.repeats), ("quant_repeats", args.quant_repeats if args.quant_repeats > 1 else None))
        if v is not None), [])
    if args.latency is not None:
        argv.append("--latency" if args.latency else "--no-latency")
    text = "random tiny Llama (tests.tiny.tiny_llama), UTF-8 bytes as tokens" if opts["model"] == "tiny" else "tokenizer of the model"
    head = {
        "command": "python -m benchmarks.run " + shlex.join(argv),
        "date": dt.datetime.now().isoformat(timespec="minutes"),
        "machine": machine(args.ep),
        "versions": versions(),
        "model": "; ".join(x for x in (str(model), _registry_note(args.model)) if x),
        "eval": f"SOTU 2017-2021, first {windows.size} tokens ({text}): {len(windows)} non-overlapping "
                f"{windows.shape[1]}-token windows, {len(windows) * (windows.shape[1] - 1)} predicted tokens; ORT {args.ep} EP",
        "calibration": f"SOTU 1990-2016, {len(calib)} random {calib.shape[1]}-token windows (seed 0) = {calib.size} "
                       "tokens, the same windows for onnxq and ORT GPTQ; ORT default/RTN/k-quant/HQQ use no data",
        "layers": "every decoder linear layer; lm_head and the embedding stay float for both tools (onnxq's default "
                  "exclude; ORT rows of quick/full/smoke pass lm_head in nodes_to_exclude)",
        "bpw": "bits per weight of the quantized layers from onnxq.inspect: stored codes + scales + zero points "
               "(+ padding to whole blocks) × 8 / K·N",
        "solvers": f"onnxq's solvers on torch {args.device}",
        "quant_repeats": args.quant_repeats,
        "quant time": ("wall time of one run of the quantizer in its own process, model load and save included "
                       "(not repeated); peak RSS of that process, + that of its solver helper process where one ran") if args.quant_repeats == 1 else (
                       f"median [min–max] of {args.quant_repeats} runs of the quantizer, each in its own process, model "
                       "load and save included; peak RSS: median over the runs; every repeat must write a "
                       "byte-identical file"),
    }
    if lat:
        head["latency"] = (f"with-past export {past} with the quantized layers moved in (logits checked against the "
                           f"quantized file); ORT {args.ep} EP, threads {args.threads or 'ORT default'}; prefill: one "
                           f"{lat['prefill']}-token forward from an empty cache; decode: {lat['decode']} single-token "
                           f"steps with KV cache after a {lat['context']}-token prompt, batch 1; {lat['warmup']} "
                           f"warm-up + median of {lat['repeats']} repeats [min–max]")
    return head


def _registry_note(name: str) -> str | None:
    """Provenance of a registry model's float weights (None for files and folders)."""
    from onnxq.models.registry import REGISTRY

    return REGISTRY[name].provenance() if name in REGISTRY else None


def _print(row: dict) -> None:
    keys = ("label", "ppl", "bpw", "size_mb", "seconds", "peak_rss_mb", "error", "latency_error")
    short = {k: row.get(k) for k in keys if row.get(k) is not None}
    if row.get("latency"):
        short["decode_tok_s"] = row["latency"]["decode_tok_s"]["median"]
        short["prefill_tok_s"] = row["latency"]["prefill_tok_s"]
    print(short, flush=True)


# ---- output ------------------------------------------------------------------------------------------------------


def _num(x, fmt="{:.2f}") -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _lat_cells(lat: dict | None) -> list[str]:
    if not lat:
        return ["", ""]
    d = lat["decode_tok_s"]
    p = lat["prefill_ms"]
    rate = lambda ms: lat["prefill_tokens"] / ms * 1e3  # noqa: E731
    return [f"{d['median']:.1f} [{d['min']:.1f}–{d['max']:.1f}]",
            f"{lat['prefill_tok_s']:.0f} [{rate(p['max']):.0f}–{rate(p['min']):.0f}]"]


def _time_cell(r: dict) -> str:
    """Quantization wall time: the one run, or median [min–max] of repeated runs."""
    runs = r.get("seconds_runs") or []
    if len(runs) < 2:
        return _num(r.get("seconds"), "{:.1f}")
    return f"{r['seconds']:.1f} [{min(runs):.1f}–{max(runs):.1f}]"


def main_cpu(rows: list[dict]) -> str | None:
    """The CPU most rows were measured on."""
    cpus = [r["cpu"] for r in rows if "cpu" in r]
    return max(cpus, key=cpus.count) if cpus else None


def marks(r: dict, cpu: str | None) -> str:
    """Footnote marks: † other processes took CPU time during the row; ‡ measured on another CPU."""
    return (" †" if busy(r) else "") + (" ‡" if cpu and r.get("cpu", cpu) != cpu else "")


def footnotes(rows: list[dict]) -> list[str]:
    """What the marks in the table mean, with the shares measured (empty when no row is marked)."""
    cpu, out = main_cpu(rows), []
    hit = [r for r in rows if busy(r)]
    if hit:
        out.append(f"† times not clean: other processes or the hypervisor took more than {BUSY_SHARE:.0%} of the CPUs "
                   "during the row (" + "; ".join(f"{r['label']}: {r['cpu_share']['other_cpu']:.0%} other, "
                                                  f"{r['cpu_share']['steal']:.0%} steal" for r in hit) + ")")
    differ = [r["label"] for r in rows if r.get("repeats_identical") is False]
    if differ:
        out.append("repeated quantization wrote different files (not deterministic): " + "; ".join(differ))
    failed = [f"{r['label']}: {r['repeat_error']}" for r in rows if r.get("repeat_error")]
    if failed:
        out.append("a repeat of the quantization failed (time of the runs before it): " + "; ".join(failed))
    other = [r for r in rows if cpu and r.get("cpu", cpu) != cpu]
    if other:
        out.append(f"‡ measured on another CPU than the other rows ({cpu}): " +
                   "; ".join(f"{r['label']} on {r['cpu']}" for r in other))
    return out


def table(rows: list[dict]) -> list[str]:
    """The main Markdown table (with a CPU-EP PPL column when the run was on another EP)."""
    fp, cpu = rows[0]["ppl"], main_cpu(rows)
    cross = any("ppl_cpu_ep" in r for r in rows)
    cols = ["setting", "format", "PPL"] + ["PPL (CPU EP)"] * cross + ["Δ vs fp32", "bits/weight", "size (MB)",
                                                                       "quant time (s)", "peak RSS (MiB)",
                                                                       "decode tok/s", "prefill tok/s"]
    lines = ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    for r in rows:
        if "error" in r:
            what = "not supported" if r.get("unsupported") else "failed"
            err = r["error"].removeprefix("Unsupported: ").replace("|", "/")
            lines.append(f"| {r['label']}{marks(r, cpu)} | {what}: {err} |" + " |" * (len(cols) - 2))
            continue
        fmt = ", ".join(r.get("formats", [])) or "float"
        if r.get("accuracy_level"):
            fmt += f" acc {'/'.join(map(str, r['accuracy_level']))}"
        lat = _lat_cells(r.get("latency"))
        if r.get("latency_error"):
            lat = [f"failed: {r['latency_error'].replace('|', '/')}", ""]
        d = "" if r is rows[0] else f"{r['ppl'] - fp:+.2f}"
        cells = [f"{r['label']}{marks(r, cpu)}", fmt, _num(r["ppl"])] + [_num(r.get("ppl_cpu_ep"))] * cross + [
            d, _num(r.get("bpw"), "{:.3f}"), _num(r.get("size_mb"), "{:.1f}"), _time_cell(r),
            _num(r.get("peak_rss_mb"), "{:.0f}") + (f" + {r['helper_rss_mb']:.0f}" if r.get("helper_rss_mb") else ""), *lat]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


ORDER = (("turboboa", "<"), ("boa", "≤"), ("gptq", "<"), ("rtn", ""))  # issue 3: TurboBoA < BoA ≤ GPTQ < RTN


def solver_order(rows: list[dict]) -> list[str]:
    """Per setting where all four onnxq solvers ran (integer zero points, MatMulNBits): does TurboBoA < BoA ≤ GPTQ <
    RTN hold in PPL, and where not, which pair breaks it."""
    ppl = {(r["algo"], r["bits"], r["group_size"]): r["ppl"] for r in rows
           if r.get("tool") == "onnxq" and r.get("ppl") is not None and not r.get("float_zero")
           and not r.get("refine_scales") and r.get("format") == "nbits" and not r.get("sym")}
    out = []
    for bits, group in dict.fromkeys((b, g) for _, b, g in ppl):
        got = [ppl.get((algo, bits, group)) for algo, _ in ORDER]
        if None in got:
            continue
        chain = " ".join(f"{algo} {x:.3f} {op}" for (algo, op), x in zip(ORDER, got)).strip()
        broken = [f"{a} {x:.3f} {'≥' if op == '<' else '>'} {b} {y:.3f}"
                  for (a, op), (b, _), x, y in zip(ORDER, ORDER[1:], got, got[1:])
                  if not (x < y if op == "<" else x <= y)]
        out.append(f"- W{bits} {group_name(group)}: {chain}: " + ("holds" if not broken else "does not hold (" + "; ".join(broken) + ")"))
    return (["", "Solver order (onnxq, integer zero points; issue 3 asks TurboBoA < BoA ≤ GPTQ < RTN):", ""] + out
            if out else [])


def write(stem: Path, head: dict, rows: list[dict], extra: list[dict]) -> None:
    """JSON with the header facts (machine, versions, tokens, command), and its Markdown."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    report_file(stem, ".json").write_text(json.dumps({"header": head, "rows": rows, "variants": extra}, indent=2))
    write_markdown(stem, head, rows, extra)


def write_markdown(stem: Path, head: dict, rows: list[dict], extra: list[dict]) -> None:
    """The .md: header facts, the main table, its footnotes, the solver order and the variants."""
    suite = head["command"].split("--suite ")[1].split()[0]
    lines = [f"# Benchmark `{suite}` ({stem.name})", ""]
    if len(rows) < head.get("rows_planned", 0):
        lines += [f"**Partial run: {len(rows)} of {head['rows_planned']} rows so far.** Finish it with "
                  f"`python -m benchmarks.run --suite {suite} --resume {stem.name}.json` (same options).", ""]
    lines += [f"- {k}: {v}" for k, v in head.items()] + [""] + table(rows)
    notes = footnotes(rows)
    lines += [""] + notes if notes else []
    lines += solver_order(rows)
    if extra:
        lines += ["", "Same weights, run differently (PPL on the same windows; latency as above):", "",
                  "| setting | form | PPL | decode tok/s | prefill tok/s |", "|---|---|---:|---:|---:|"]
        for v in extra:
            if "error" in v:
                lines.append(f"| {v['label']} | failed: {v['error']} | | | |")
                continue
            lat = _lat_cells(v.get("latency"))
            lines.append(f"| {v['label']} | {v['form']} | {_num(v.get('ppl'))} | {lat[0]} | {lat[1]} |")
    report_file(stem, ".md").write_text("\n".join(lines) + "\n")


def update_table(path: Path, stem: Path) -> None:
    """Write `path` (benchmarks/results/table.md) whole: the results file's header facts, its main table, footnotes and
    plot, with links relative to `path`. Everything in it is generated; the README links to it."""
    data = json.loads(report_file(stem, ".json").read_text())
    head = data["header"]
    rel = lambda p: os.path.relpath(p, path.parent)  # noqa: E731
    body = ["# Full benchmark table", "",
            "<!-- generated by `python -m benchmarks.run ... --update-table` (or `--render RESULTS.json "
            "--update-table`): do not edit -->", "",
            f"`{head['command']}` ({head['date']}; {head['machine']}). Full header, variants and JSON: "
            f"[{stem.name}.md]({rel(report_file(stem, '.md'))}).", ""]
    body += table(data["rows"])
    notes = footnotes(data["rows"])
    body += [""] + notes if notes else []
    if report_file(stem, ".png").is_file():
        body += ["", f"![PPL against bits per weight]({rel(report_file(stem, '.png'))})"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(body) + "\n")
    tmp.replace(path)

if __name__ == "__main__":
    sys.exit(main())
