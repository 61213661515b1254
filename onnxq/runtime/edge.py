"""Edge execution providers: run a model on CPU, CUDA, OpenVINO or onnxruntime-web (WASM / WebGPU in headless
Chromium), compare its logits with the CPU EP, time it, and tell which provider every quantized node ran on.

* cpu, cuda: this process's onnxruntime (`ort_worker.run`).
* openvino: this onnxruntime if its build has OpenVINOExecutionProvider, else the `onnxruntime-openvino` build in
  `.venv-openvino` (made by scripts/setup.sh; `ONNXQ_OPENVINO_PYTHON` points elsewhere), run as a subprocess,
  because that package installs the same `onnxruntime` module as the CPU one.
* web-wasm, web-webgpu: `onnxq/runtime/web/index.html` (onnxruntime-web from npm) served on 127.0.0.1 and driven in
  headless Chromium by `onnxq/runtime/web/drive.mjs` (playwright-core, Debian's /usr/bin/chromium).

Node placement: ORT's graph assignment record (`session.record_ep_graph_assignment_info`) in Python; in the
browser, ORT's verbose session log ("Node(s) placed on [EP]", one line per node). Latency: the median of `runs`
timed forwards of the prompt (prefill) and of one token (what a decode step costs in the weight matmuls; the
models onnxq exports carry no KV cache).
"""
from __future__ import annotations

import base64
import functools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.errors import OnnxqError

from . import ort_worker
from .session import providers_for

EDGE_EPS = ("cpu", "cuda", "openvino", "web-wasm", "web-webgpu")
WEB_DIR = Path(__file__).parent / "web"
REPO = Path(__file__).resolve().parents[2]
# the ORT provider each edge EP should place quantized nodes on; web-wasm is the CPU EP compiled to WebAssembly,
# web-webgpu is onnxruntime-web's WebGPU backend (JSEP: JsExecutionProvider)
EP_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
               "openvino": "OpenVINOExecutionProvider", "web-wasm": "CPUExecutionProvider",
               "web-webgpu": "JsExecutionProvider"}
# Chromium's software WebGPU: SwiftShader Vulkan (shipped in Debian's chromium). --disable-gpu hides every adapter,
# so web-webgpu drops that one flag of the required set.
WEBGPU_FLAGS = ["--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-vulkan=swiftshader",
                "--use-webgpu-adapter=swiftshader"]
# logits tolerance (rel_l2 against the CPU EP with fp32 activations), justified in docs/edge.md ("Tolerance"): fp32
# kernels that differ only in summation order. A model that asks for int8 activations (accuracy_level=4) may be run
# with them: then the EP may be up to INT8_MARGIN x as far from fp32 as the CPU EP's own int8 run is.
TOL_FP32 = 1e-4
# WebGPU shaders: WGSL's exp / inverseSqrt / pow are only specified to a few ULP and reductions run in other orders
TOL_WEBGPU = 1e-3
INT8_MARGIN = 2.0
# the CPU EP fuses 4-bit DequantizeLinear -> MatMul into MatMulNBits at this accuracy level (ORT default 4)
_QDQ_LEVEL = "session.qdq_matmulnbits_accuracy_level"
_FEEDABLE = {"input_ids", "attention_mask", "position_ids"}


@dataclass
class EdgeRun:
    """One model on one EP: timings (ms), where the quantized nodes ran, and the logits (not serialized)."""

    ep: str
    runtime: str
    providers: list[str]
    threads: int | None
    create_ms: float
    first_ms: float
    prefill_ms: float  # median forward over the prompt
    token_ms: float  # median forward of one token
    placement: dict[str, str]  # quantized node -> provider it ran on ("" = not in the placement record)
    logits: np.ndarray | None = field(default=None, repr=False)


@dataclass
class EdgeReport:
    """The EP run against the CPU EP on the same prompt."""

    model: str
    ep: str
    prompt_tokens: int
    run: EdgeRun
    reference: EdgeRun
    match: dict
    placement: dict
    cpu_int8: dict | None = None  # the CPU EP as written (int8 activations) against its fp32-activation run
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Logits within tolerance and every quantized node on the EP."""
        return bool(self.match["ok"] and self.placement["all_on_ep"])

    def to_dict(self) -> dict:
        """JSON-ready dict (logits left out)."""
        out = asdict(self)
        for key in ("run", "reference"):
            out[key].pop("logits", None)
        out["ok"] = self.ok
        return out

    def markdown(self) -> str:
        """Latency, logits match and placement as a small table and two lines."""
        m, p = self.match, self.placement
        rows = ["| EP | runtime | threads | session (ms) | prefill (ms) | ms/token (1-token forward) |",
                "|---|---|---:|---:|---:|---:|"]
        runs = [(self.ep, self.run)] + ([("cpu (reference)", self.reference)] if self.ep != "cpu" else [])
        for tag, x in runs:
            rows.append(f"| {tag} | {x.runtime} | {x.threads or 'default'} | {x.create_ms:.0f} | {x.prefill_ms:.2f} | "
                        f"{x.token_ms:.2f} |")
        fall = p["fallback"]
        lines = [
            f"Edge check of `{Path(self.model).name}` on `{self.ep}`: {self.prompt_tokens}-token prompt, medians of "
            "timed runs after a warm-up.", "", *rows, "",
            f"Logits vs CPU EP{' with fp32 activations' if self.cpu_int8 else ''}: rel_l2 {m['rel_l2']:.3g}, "
            f"max_abs {m['max_abs']:.3g}, top-1 agreement {m['top1_agreement']:.3f} "
            f"(last position {'same' if m['last_top1_same'] else 'DIFFERENT'}) -> "
            f"{'match' if m['ok'] else 'MISMATCH'} (tolerance rel_l2 <= {m['tol_rel_l2']:.3g}: {m['tolerance']}"
            + (f"; within the fp32 tolerance {fp32_tolerance(self.ep):g} too"
               if self.cpu_int8 and m.get("within_fp32_tolerance") and self.ep != "cpu" else "") + ").",
            f"Placement: {p['on_ep']}/{p['layers']} quantized nodes on {p['provider']}"
            + (f"; fell back: {', '.join(fall[:5])}{' …' if len(fall) > 5 else ''}" if fall else "")
            + (f"; not in the placement record: {len(p['unknown'])}" if p["unknown"] else "") + ".",
        ]
        if self.cpu_int8:
            g = self.cpu_int8
            lines.append(f"The CPU EP as written ({g['why']}) is {g['rel_l2']:.3g} rel_l2 from its fp32-activation "
                         f"run (top-1 agreement {g['top1_agreement']:.3f}); the logits reference is the fp32 one.")
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- model facts
def quantized_nodes(model: str | Path) -> dict[str, list[str]]:
    """Quantized layer -> the nodes that compute it: a MatMulNBits / GatherBlockQuantized node, or a weight
    DequantizeLinear and the MatMul / Gemm / Gather that reads it. Weights are not loaded."""
    graph = onnx.load(str(model), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    layers: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            layers[node.name or node.output[0]] = [node.name or node.output[0]]
        elif node.op_type == "DequantizeLinear" and node.input and node.input[0] in inits:
            for user in readers.get(node.output[0], []):
                if user.op_type in ("MatMul", "Gemm", "Gather"):
                    layers[user.name or user.output[0]] = [node.name or node.output[0], user.name or user.output[0]]
    return layers


def int8_activations(model: str | Path) -> dict[str, int]:
    """Layers the CPU EP runs with int8 activations: MatMulNBits with accuracy_level=4 ("nbits") and 4-bit weight
    DequantizeLinear -> MatMul, which ORT fuses into MatMulNBits at session.qdq_matmulnbits_accuracy_level 4 ("qdq")."""
    graph = onnx.load(str(model), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    nbits = sum(1 for n in graph.node if n.op_type == "MatMulNBits" and any(
        a.name == "accuracy_level" and a.i == 4 for a in n.attribute))
    four_bit = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    qdq = sum(1 for n in graph.node if n.op_type == "DequantizeLinear" and n.input
              and n.input[0] in inits and inits[n.input[0]].data_type in four_bit)
    return {"nbits": nbits, "qdq": qdq}


def _fp32_activation_copy(model: Path) -> Path:
    """A copy of `model` beside it (so external data resolves) with every MatMulNBits at accuracy_level 0."""
    proto = onnx.load(str(model), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = 0
    fd, name = tempfile.mkstemp(prefix=f".{model.stem}.fp32act-", suffix=".onnx", dir=model.parent)
    os.close(fd)
    onnx.save_model(proto, name)
    return Path(name)


def external_data_files(model: str | Path) -> list[str]:
    """Relative paths of the external-data files a model references."""
    graph = onnx.load(str(model), load_external_data=False).graph
    return sorted({e.value for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                   for e in t.external_data if e.key == "location"})


def prompt_feeds(model: str | Path, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """input_ids / attention_mask / position_ids for a fresh run of the inputs the model declares."""
    names = [i.name for i in onnx.load(str(model), load_external_data=False).graph.input]
    bad = [n for n in names if n not in _FEEDABLE]
    if bad:
        raise OnnxqError(f"model input {bad[0]!r} is not one the edge check can feed: export without KV cache "
                         "(task text-generation)")
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    batch, seq = ids.shape
    full = {"input_ids": ids, "attention_mask": np.ones((batch, seq), np.int64),
            "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()}
    return {n: full[n] for n in names}


# -------------------------------------------------------------------------------------------- in-process / OpenVINO
def _in_process(model: Path, ep: str, feeds, timing, *, threads, warmup, runs) -> EdgeRun:
    providers: list = providers_for(ep)
    if ep == "openvino":
        providers = [["OpenVINOExecutionProvider", _ov_options(threads)], "CPUExecutionProvider"]
    try:
        out = ort_worker.run(str(model), providers, feeds, timing=timing, outputs=["logits"], warmup=warmup,
                             runs=runs, threads=threads)
    except Exception as err:  # noqa: BLE001 - ORT raises several types; the user gets one line
        raise OnnxqError(f"{ep}: onnxruntime failed to run {model.name}: {' '.join(str(err).split())[:400]}") from err
    return _edge_run(ep, f"onnxruntime {ort.__version__}", out["meta"], out["outputs"]["logits"], threads)


def _ov_options(threads: int | None) -> dict:
    options = {"device_type": "CPU"}
    if threads:
        options["num_of_threads"] = str(threads)
    return options


def openvino_python() -> Path | None:
    """The Python of a venv with onnxruntime-openvino: $ONNXQ_OPENVINO_PYTHON, else <repo>/.venv-openvino."""
    env = os.environ.get("ONNXQ_OPENVINO_PYTHON")
    if env:
        return Path(env)
    candidate = REPO / ".venv-openvino" / "bin" / "python"
    return candidate if candidate.exists() else None


def openvino_available() -> tuple[bool, str]:
    """(whether the OpenVINO EP can run here, why not)."""
    if "OpenVINOExecutionProvider" in ort.get_available_providers():
        return True, ""
    py = openvino_python()
    if py is None:
        return False, ("no OpenVINO EP: this onnxruntime lacks OpenVINOExecutionProvider and there is no "
                       ".venv-openvino (run scripts/setup.sh, or set ONNXQ_OPENVINO_PYTHON)")
    code = "import onnxruntime as o; print(o.__version__, *o.get_available_providers())"
    try:
        probe = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"{py} does not run: {err}"
    if probe.returncode or "OpenVINOExecutionProvider" not in probe.stdout:
        why = (probe.stderr.strip().splitlines() or [probe.stdout.strip()])[-1]
        return False, f"{py} has no OpenVINOExecutionProvider: {why}"
    return True, ""


def _openvino_subprocess(model: Path, feeds, timing, *, threads, warmup, runs, timeout: float) -> EdgeRun:
    ok, why = openvino_available()
    if not ok:
        raise OnnxqError(f"openvino: {why}")
    py = openvino_python()
    with tempfile.TemporaryDirectory(prefix="onnxq-ov-") as tmp:
        def save(prefix: str, arrays: dict) -> dict:
            paths = {}
            for name, value in arrays.items():
                paths[name] = f"{tmp}/{prefix}-{name}.npy"
                np.save(paths[name], value)
            return paths

        job = {"model": str(model.resolve()), "providers": [["OpenVINOExecutionProvider", _ov_options(threads)],
               "CPUExecutionProvider"], "inputs": save("in", feeds), "timing": save("tok", timing) if timing else None,
               "outputs": ["logits"], "warmup": warmup, "runs": runs, "threads": threads}
        Path(f"{tmp}/job.json").write_text(json.dumps(job))
        try:
            proc = subprocess.run([str(py), str(Path(ort_worker.__file__).resolve()), f"{tmp}/job.json",
                                   f"{tmp}/out.npz"], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise OnnxqError(f"openvino: onnxruntime-openvino took over {timeout:.0f} s on {model.name}") from err
        if proc.returncode:
            err = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise OnnxqError(f"openvino: onnxruntime-openvino failed on {model.name}: {err[:400]}")
        with np.load(f"{tmp}/out.npz") as data:
            meta = json.loads(str(data["meta"]))
            logits = data["out:logits"]
    return _edge_run("openvino", f"onnxruntime-openvino {meta['ort_version']}", meta, logits, threads)


def _edge_run(ep: str, runtime: str, meta: dict, logits: np.ndarray, threads) -> EdgeRun:
    placement = {name: entry[1] for name, entry in meta["placement"].items()}
    return EdgeRun(ep, runtime, meta["providers"], threads, meta["create_ms"], meta["first_ms"],
                   _median(meta["run_ms"]), _median(meta["token_ms"]), placement, logits)


# ------------------------------------------------------------------------------------------------------ browser
def chromium_path() -> str | None:
    """Chromium to drive: $ONNXQ_CHROMIUM, else chromium on PATH (Debian's /usr/bin/chromium)."""
    return os.environ.get("ONNXQ_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def web_available() -> tuple[bool, str]:
    """(whether the browser runner can start here, why not)."""
    if shutil.which("node") is None:
        return False, "node is not on PATH (apt-get install nodejs, or run scripts/setup.sh)"
    if chromium_path() is None:
        return False, "chromium is not installed (apt-get install chromium, or set ONNXQ_CHROMIUM)"
    for package in ("onnxruntime-web", "playwright-core"):
        if not (WEB_DIR / "node_modules" / package / "package.json").is_file():
            return False, f"{package} is not installed in onnxq/runtime/web (run: npm ci --prefix onnxq/runtime/web)"
    return True, ""


class _Handler(SimpleHTTPRequestHandler):
    """onnxq/runtime/web at /, one model folder at /model/; cross-origin isolated so WASM threads are allowed."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript",
                      ".mjs": "text/javascript", ".wasm": "application/wasm", ".onnx": "application/octet-stream"}

    def __init__(self, *args, model_dir: Path, **kwargs):
        self.model_dir = model_dir
        super().__init__(*args, directory=str(WEB_DIR), **kwargs)

    def translate_path(self, path: str) -> str:
        if path.startswith("/model/"):
            name = unquote(path[len("/model/"):].split("?", 1)[0].split("#", 1)[0])
            target = (self.model_dir / name).resolve()
            return str(target) if target.parent == self.model_dir.resolve() else str(self.model_dir / ".missing")
        return super().translate_path(path)

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet
        pass


class WebServer:
    """`with WebServer(model_dir) as url:` serves the runner page and the model on 127.0.0.1 (a free port)."""

    def __init__(self, model_dir: Path):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, model_dir=Path(model_dir)))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_browser(job: dict, *, timeout: float = 600) -> dict:
    """Run drive.mjs on a job (see its header) and return its JSON result."""
    ok, why = web_available()
    if not ok:
        raise OnnxqError(f"browser runner unavailable: {why}")
    job = {"executablePath": chromium_path(), "timeoutMs": int(timeout * 1000), **job}
    with tempfile.TemporaryDirectory(prefix="onnxq-web-") as tmp:
        Path(f"{tmp}/job.json").write_text(json.dumps(job))
        try:
            proc = subprocess.run(["node", str(WEB_DIR / "drive.mjs"), f"{tmp}/job.json", f"{tmp}/result.json"],
                                  capture_output=True, text=True, timeout=timeout + 60, cwd=WEB_DIR)
        except subprocess.TimeoutExpired as err:
            raise OnnxqError(f"browser runner timed out after {timeout + 60:.0f} s") from err
        result_file = Path(f"{tmp}/result.json")
        if not result_file.is_file():
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise OnnxqError(f"browser runner failed (exit {proc.returncode}): {err[:400]}")
        return json.loads(result_file.read_text())


@functools.cache
def webgpu_probe(timeout: float = 120) -> dict:
    """What WebGPU headless Chromium offers: with the required --disable-gpu, and with SwiftShader (once a process)."""
    out = {}
    with WebServer(WEB_DIR) as url:
        for tag, extra in (("disable-gpu", {}), ("swiftshader", {"keepGpu": True, "extraArgs": WEBGPU_FLAGS})):
            res = run_browser({"url": f"{url}/index.html", "probeWebgpu": True, **extra}, timeout=timeout)
            out[tag] = res.get("webgpu") or {"available": False, "reason": res.get("result", {}).get("error", "?")}
    return out


def _tensor_spec(name: str, array: np.ndarray) -> dict:
    return {"name": name, "dtype": str(array.dtype), "dims": list(array.shape),
            "b64": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()}


_PLACED = re.compile(r"(All nodes|Node\(s\)) placed on \[(\w+)\]")
_NODE = re.compile(r"VerifyEachNodeIsAssignedToAnEp\]\s{3}(\S+) \((.*)\)\s*$")


def parse_placement(lines: list[str], nodes: list[str]) -> dict[str, str]:
    """Node -> provider from ORT's verbose "Node placements" log. "All nodes placed on [EP]" covers every node."""
    placement: dict[str, str] = {}
    current = None
    for line in lines:
        if "VerifyEachNodeIsAssignedToAnEp" not in line:
            continue
        found = _PLACED.search(line)
        if found:
            current = found.group(2)
            if found.group(1) == "All nodes":
                return {n: current for n in nodes}
            continue
        node = _NODE.search(line)
        if node and current:
            placement[node.group(2)] = current
    return placement


def _browser(model: Path, ep: str, feeds, timing, *, threads, warmup, runs, timeout: float) -> EdgeRun:
    backend = "webgpu" if ep == "web-webgpu" else "wasm"
    request = {"model": f"/model/{model.name}", "ep": backend, "threads": threads or 0, "warmup": warmup,
               "runs": runs, "outputs": ["logits"], "verbose": True,
               "externalData": [{"path": f, "data": f"/model/{f}"} for f in external_data_files(model)],
               "inputs": [_tensor_spec(k, v) for k, v in feeds.items()],
               "timing": [_tensor_spec(k, v) for k, v in timing.items()] if timing else None}
    extra = {"keepGpu": True, "extraArgs": WEBGPU_FLAGS} if backend == "webgpu" else {}
    with WebServer(model.parent) as url:
        res = run_browser({"url": f"{url}/index.html", "request": request, "probeWebgpu": backend == "webgpu",
                           **extra}, timeout=timeout)
    result = res.get("result") or {}
    if not result.get("ok"):
        gpu = res.get("webgpu") or {}
        hint = f" (WebGPU: {gpu.get('reason')})" if gpu and not gpu.get("available") else ""
        raise OnnxqError(f"{ep}: onnxruntime-web failed on {model.name}: "
                         f"{' '.join(str(result.get('error', 'no result')).split())[:400]}{hint}")
    out = next(o for o in result["outputs"] if o["name"] == "logits")
    logits = np.frombuffer(base64.b64decode(out["b64"]), dtype=np.float32).reshape(out["dims"])
    nodes = [n for group in quantized_nodes(model).values() for n in group]
    meta = {"providers": [EP_PROVIDER[ep]] + (["CPUExecutionProvider"] if backend == "webgpu" else []),
            "create_ms": result["createMs"], "first_ms": result["firstMs"], "run_ms": result["runMs"],
            "token_ms": result["tokenMs"],
            "placement": {n: ["", p] for n, p in parse_placement(result.get("logs", []), nodes).items()}}
    runtime = f"onnxruntime-web {result.get('ortVersion', '?')} ({backend}) in Chromium {res.get('browser', '?')}"
    return _edge_run(ep, runtime, meta, logits, result.get("threads"))


# ------------------------------------------------------------------------------------------------------- public
def run_on(model: str | Path, ep: str, input_ids: np.ndarray, *, threads: int | None = None, warmup: int = 2,
           runs: int = 5, timeout: float = 600) -> EdgeRun:
    """Run `model` on edge EP `ep` with a prompt `input_ids` [1, L]: logits, timings, placement."""
    if ep not in EDGE_EPS:
        raise OnnxqError(f"unknown edge execution provider {ep!r}: use one of {', '.join(EDGE_EPS)}")
    model = Path(model)
    if not model.is_file():
        raise OnnxqError(f"model file '{model}' not found: give an existing .onnx file")
    feeds = prompt_feeds(model, input_ids)
    timing = prompt_feeds(model, input_ids[:, -1:]) if runs else None
    kw = {"threads": threads, "warmup": warmup, "runs": runs}
    if ep.startswith("web-"):
        return _browser(model, ep, feeds, timing, timeout=timeout, **kw)
    if ep == "openvino" and "OpenVINOExecutionProvider" not in ort.get_available_providers():
        return _openvino_subprocess(model, feeds, timing, timeout=timeout, **kw)
    return _in_process(model, ep, feeds, timing, **kw)


def compare(reference: np.ndarray, logits: np.ndarray, tol_rel_l2: float = TOL_FP32, tolerance: str = "") -> dict:
    """rel_l2 = ‖Δ‖₂/‖ref‖₂ over all logits, max_abs, top-1 agreement over positions, same last-position
    argmax; ok when rel_l2 <= tol_rel_l2 (the last position's argmax is reported, not required: near-ties may flip)."""
    if reference.shape != logits.shape:
        raise OnnxqError(f"logits shapes differ: CPU {list(reference.shape)} vs EP {list(logits.shape)}")
    ref, out = reference.astype(np.float64), logits.astype(np.float64)
    diff = out - ref
    rel = math.sqrt(float((diff**2).sum()) / max(float((ref**2).sum()), 1e-30))
    agree = ref.argmax(-1) == out.argmax(-1)
    return {"rel_l2": rel, "max_abs": float(np.abs(diff).max()), "top1_agreement": float(agree.mean()),
            "last_top1_same": bool(agree[..., -1].all()), "tol_rel_l2": tol_rel_l2, "tolerance": tolerance,
            "ok": bool(rel <= tol_rel_l2)}


def placement_summary(model: str | Path, run: EdgeRun) -> dict:
    """Which quantized layers ran wholly on the EP's provider, which fell back, which the record does not name."""
    provider = EP_PROVIDER[run.ep]
    on, fallback, unknown = [], [], []
    layers = quantized_nodes(model)
    for layer, nodes in layers.items():
        where = [run.placement.get(n, "") for n in nodes]
        if any(w and w != provider for w in where):
            fallback.append(f"{layer} ({'/'.join(sorted({w for w in where if w and w != provider}))})")
        elif all(where):
            on.append(layer)
        else:
            unknown.append(layer)
    return {"provider": provider, "layers": len(layers), "on_ep": len(on), "fallback": fallback, "unknown": unknown,
            "all_on_ep": not fallback and not unknown}


def edge_eval(model: str | Path, ep: str, input_ids: np.ndarray, *, threads: int | None = None, warmup: int = 2,
              runs: int = 5, timeout: float = 600) -> EdgeReport:
    """`model` on `ep` against the CPU EP on the same prompt: logits match, latency, placement of quantized nodes.

    The reference logits are the CPU EP's with fp32 activations. When the model asks for int8 activations
    (MatMulNBits accuracy_level=4, or 4-bit QDQ that the CPU EP fuses at level 4), that reference comes from a
    copy at accuracy_level 0, and the CPU EP as written is reported against it as `cpu_int8`.
    """
    model = Path(model)
    input_ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
    kw = {"threads": threads, "warmup": warmup, "runs": runs, "timeout": timeout}
    cpu = run_on(model, "cpu", input_ids, **kw)
    int8 = int8_activations(model) if model.is_file() else {"nbits": 0, "qdq": 0}
    reference, cpu_int8 = cpu, None
    if int8["nbits"] or int8["qdq"]:
        copy = _fp32_activation_copy(model) if int8["nbits"] else model
        try:
            exact = ort_worker.run(str(copy), ["CPUExecutionProvider"], prompt_feeds(model, input_ids),
                                   outputs=["logits"], warmup=0, runs=0, threads=threads, config={_QDQ_LEVEL: "0"})
        finally:
            if copy != model:
                copy.unlink(missing_ok=True)
        reference = EdgeRun("cpu", cpu.runtime + " (fp32 activations)", cpu.providers, threads, float("nan"),
                            float("nan"), float("nan"), float("nan"), {}, exact["outputs"]["logits"])
        why = " and ".join(f"{n} {k}" for k, n in (("MatMulNBits at accuracy_level=4", int8["nbits"]),
                                                   ("4-bit QDQ layers fused at level 4", int8["qdq"])) if n)
        cpu_int8 = {"why": why, **compare(reference.logits, cpu.logits)}
        del cpu_int8["ok"], cpu_int8["tol_rel_l2"], cpu_int8["tolerance"]
    run = cpu if ep == "cpu" else run_on(model, ep, input_ids, **kw)
    # the CPU EP runs int8 activations where asked (and fuses QDQ at level 4); another EP may honour accuracy_level=4
    base = fp32_tolerance(ep)
    tol, why = base, ("fp32 activations in WGSL shaders" if ep == "web-webgpu" else
                      "fp32 activations: only summation order differs")
    if cpu_int8 and (int8["nbits"] or ep == "cpu"):
        tol = max(base, INT8_MARGIN * cpu_int8["rel_l2"])
        why = (f"the model asks for int8 activations: up to {INT8_MARGIN:g}x the CPU EP's own int8 error "
               f"(rel_l2 {cpu_int8['rel_l2']:.3g})")
    notes = []
    if ep == "web-webgpu":
        notes.append("WebGPU in headless Chromium is SwiftShader (software Vulkan on the CPU), started without "
                     "--disable-gpu: its latency says nothing about a real GPU.")
    if ep == "web-wasm":
        notes.append("web-wasm is ONNX Runtime's CPU EP compiled to WebAssembly (SIMD); every node runs on it or "
                     "session creation fails.")
    match = compare(reference.logits, run.logits, tol, why)
    match["within_fp32_tolerance"] = bool(match["rel_l2"] <= base)  # the EP computed fp32 activations after all
    return EdgeReport(str(model), ep, int(input_ids.shape[1]), run, cpu, match, placement_summary(model, run),
                      cpu_int8, notes)


def fp32_tolerance(ep: str) -> float:
    """rel_l2 allowed against the CPU EP when both compute fp32 activations (WebGPU shaders are looser)."""
    return TOL_WEBGPU if ep == "web-webgpu" else TOL_FP32


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


__all__ = ["EDGE_EPS", "EP_PROVIDER", "EdgeReport", "EdgeRun", "WebServer", "compare", "edge_eval",
           "openvino_available", "parse_placement", "placement_summary", "quantized_nodes", "run_on", "web_available",
           "webgpu_probe"]

if __name__ == "__main__":  # pragma: no cover - manual probe
    print(json.dumps(webgpu_probe(), indent=2), file=sys.stdout)
