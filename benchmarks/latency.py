"""CPU-EP (or CUDA-EP) latency of a decoder with a KV cache: prefill of N tokens and batch-1 decode tokens/s.

    python -m benchmarks.latency WITH_PAST.onnx [--quant QUANT.onnx] [--accuracy-level 0|4] [--prefill 512]
        [--context 128] [--decode 32] [--warmup 1] [--repeats 5] [--ep cpu] [--threads N]

The quantizers write models without a KV cache (optimum task text-generation), which is what calibration and
perplexity use. For latency, `transplant` moves the quantized layers of such a model (MatMulNBits, or
DequantizeLinear→MatMul/Gemm/Gather, GatherBlockQuantized) into the float export *with* past (task
text-generation-with-past): each quantized node's output tensor names the float node it replaces, since optimum
names tensors after module paths in both exports. `check_transplant` then compares the logits of the two models on
one short sequence, so a latency is only quoted for the very weights whose perplexity was measured.

Method (`measure`): one ORT session on the file; `warmup` untimed repeats, then `repeats` timed ones.
* prefill: one forward of `prefill` tokens from an empty cache (all logits computed, as the export does);
* decode: after an untimed prefill of `context` tokens, `decode` steps of one token each, feeding back the present
  key/values; a repeat's rate is decode / (sum of step times). On CUDA the cache stays on the GPU between steps
  (IOBinding) and only the logits come back; on the CPU EP it goes through numpy arrays.
Reported: medians over repeats with min and max. Token ids come from the caller (real text) or are i mod vocab;
the cost of a step does not depend on which token it is.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import onnx

from onnxq.errors import OnnxqError

DEVICE_CACHE = {"cuda": "cuda", "tensorrt": "cuda"}  # EPs whose decode keeps the KV cache on the device
PREFIX = "q::"  # transplanted initializers and intermediate tensors, so they never collide with the host's names


# ---- moving quantized layers into the with-past graph ----------------------------------------------------------


def _quant_nodes(graph: onnx.GraphProto) -> tuple[list[onnx.NodeProto], set[str]]:
    """Nodes that make up the quantized layers, and the output names they hand to the rest of the graph."""
    inits = {t.name for t in graph.initializer}
    dq_out = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and all(i in inits for i in n.input if i)}
    chosen, anchors = [], set()
    for n in graph.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            chosen.append(n)
            anchors.add(n.output[0])
        elif n.op_type == "DequantizeLinear" and n.output[0] in dq_out:
            chosen.append(n)
        elif n.op_type in ("MatMul", "Gemm", "Gather") and any(i in dq_out for i in n.input):
            chosen.append(n)
            anchors.add(n.output[0])
    return chosen, anchors


def transplant(quant: str | Path, host: str | Path, out: str | Path) -> dict:
    """Write `host` (float, with past) with every quantized layer of `quant` (same model, no past) moved in.

    Returns {"replaced": n, "removed_initializers": m}. Raises OnnxqError when a quantized layer has no counterpart
    in the host or reads a tensor the host does not have.
    """
    from onnxq.graph.io import load_model, save_model_atomic
    from onnxq.graph.metadata import read_provenance
    from onnxq.formats.rewrite import _raise_opset

    q = load_model(quant)
    if read_provenance(q).get("rotate") is True:
        raise OnnxqError(f"{quant} was quantized with --rotate, which also changes float weights (norm scales, online "
                         "rotations): moving only its quantized layers would be wrong; quantize the with-past export")
    h = load_model(host)
    nodes, anchors = _quant_nodes(q.graph)
    if not nodes:
        raise OnnxqError(f"{quant} holds no quantized layer (MatMulNBits / DequantizeLinear / GatherBlockQuantized)")
    q_inits = {t.name: t for t in q.graph.initializer}
    produced_in_q = {o for n in nodes for o in n.output}
    host_producer = {o: i for i, n in enumerate(h.graph.node) for o in n.output}
    host_values = set(host_producer) | {i.name for i in h.graph.input} | {t.name for t in h.graph.initializer}
    missing = sorted(a for a in anchors if a not in host_producer)
    if missing:
        raise OnnxqError(f"{len(missing)} quantized layers have no float counterpart in {host} (e.g. {missing[0]}): "
                         "export both models from the same source")

    def rename(name: str) -> str:
        if name in q_inits or (name in produced_in_q and name not in anchors):
            return PREFIX + name
        if name and name not in anchors and name not in host_values:
            raise OnnxqError(f"quantized layer input {name!r} does not exist in {host}: export both from the same source")
        return name

    new_nodes = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = PREFIX + n.name
        c.input[:] = [rename(i) if i else i for i in n.input]
        c.output[:] = [rename(o) if o not in anchors else o for o in n.output]
        new_nodes.append(c)
    replaced = {host_producer[a] for a in anchors}
    # each quantized layer takes the place of the float node it replaces; its DequantizeLinear goes just before
    by_anchor = {}
    for c in new_nodes:
        by_anchor.setdefault(next((o for o in c.output if o in anchors), None), []).append(c)
    pending_dq = by_anchor.pop(None, [])
    graph_nodes = []
    for i, n in enumerate(h.graph.node):
        if i not in replaced:
            graph_nodes.append(n)
            continue
        for c in by_anchor[n.output[0]]:
            needs = set(c.input)
            graph_nodes.extend(d for d in pending_dq if d.output[0] in needs)
            pending_dq = [d for d in pending_dq if d.output[0] not in needs]
            graph_nodes.append(c)
    graph_nodes = pending_dq + graph_nodes  # DequantizeLinear read only initializers: safe anywhere
    del h.graph.node[:]
    h.graph.node.extend(graph_nodes)
    used = {i for n in h.graph.node for i in n.input} | {o.name for o in h.graph.output}
    keep = [t for t in h.graph.initializer if t.name in used]
    removed = len(h.graph.initializer) - len(keep)
    del h.graph.initializer[:]
    h.graph.initializer.extend(keep)
    wanted = dict.fromkeys(i for c in new_nodes for i in c.input if i.startswith(PREFIX) and i[len(PREFIX):] in q_inits)
    for name in wanted:
        t = onnx.TensorProto()
        t.CopyFrom(q_inits[name[len(PREFIX):]])
        t.name = name
        h.graph.initializer.append(t)
    _merge_opsets(h, q, _raise_opset)
    del h.metadata_props[:]
    h.metadata_props.extend(q.metadata_props)
    save_model_atomic(h, out)
    return {"replaced": len(replaced), "removed_initializers": removed}


def _merge_opsets(host: onnx.ModelProto, quant: onnx.ModelProto, raise_opset) -> None:
    """Give the host the quantized model's domains; a higher default-domain opset goes through onnxq's checked raise."""
    have = {o.domain or "ai.onnx": o for o in host.opset_import}
    for o in quant.opset_import:
        d = o.domain or "ai.onnx"
        if d == "ai.onnx":
            if o.version > have[d].version:
                raise_opset(host, o.version)
        elif d not in have:
            host.opset_import.append(onnx.helper.make_opsetid(o.domain, o.version))
        else:
            have[d].version = max(have[d].version, o.version)
    host.ir_version = max(host.ir_version, quant.ir_version)


def restamp(src: str | Path, out: str | Path, accuracy_level: int) -> int:
    """Copy of `src` with every MatMulNBits' accuracy_level set (0 removes the attribute); returns the count."""
    from onnxq.graph.io import load_model, save_model_atomic

    m = load_model(src)
    count = 0
    for n in m.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        keep = [a for a in n.attribute if a.name != "accuracy_level"]
        del n.attribute[:]
        n.attribute.extend(keep)
        if accuracy_level:
            n.attribute.append(onnx.helper.make_attribute("accuracy_level", accuracy_level))
        count += 1
    save_model_atomic(m, out)
    return count


def check_transplant(quant: str | Path, with_past: str | Path, ids: np.ndarray, *, ep: str = "cpu",
                     tol: float = 1e-3) -> float:
    """Relative L2 distance of the two models' logits on `ids` [1, T]; raises OnnxqError above `tol`."""
    from onnxq.runtime.evaluate import _logits
    from onnxq.runtime.session import make_session

    a = _logits(make_session(quant, ep), ids).astype(np.float64)
    b = _logits(make_session(with_past, ep), ids).astype(np.float64)
    err = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
    if not err <= tol:
        raise OnnxqError(f"the with-past copy of {quant} disagrees with it (logits rel L2 {err:.2e} > {tol}): "
                         "the transplant is wrong")
    return err


# ---- timing ----------------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure(model: str | Path, *, ep: str = "cpu", prefill: int = 512, context: int = 128, decode: int = 32,
            warmup: int = 1, repeats: int = 5, threads: int | None = None, tokens: np.ndarray | None = None,
            disabled_optimizers: list[str] | None = None) -> dict:
    """Prefill and decode latency of a with-past decoder file (see the module docstring)."""
    from onnxq.runtime.session import make_session, model_feeds

    t0 = time.perf_counter()
    session = make_session(model, ep, threads=threads, disabled_optimizers=disabled_optimizers)
    create_s = time.perf_counter() - t0
    names = [i.name for i in session.get_inputs()]
    past_names = [n for n in names if n.startswith("past_key_values")]
    if not past_names:
        raise OnnxqError(f"{model} has no past_key_values inputs: latency needs the with-past export "
                         "(export_onnx(..., with_past=True))")
    outputs = [o.name for o in session.get_outputs()]
    present = {n: n.replace("past_key_values", "present") for n in past_names}
    if any(p not in outputs for p in present.values()):
        raise OnnxqError(f"{model} lacks present.* outputs matching its past_key_values inputs")
    vocab = session.get_outputs()[0].shape[-1]
    need = max(prefill, context + decode)
    if tokens is None or len(tokens) < need:
        tokens = np.arange(need, dtype=np.int64) % (vocab if isinstance(vocab, int) else 256)
    tokens = np.asarray(tokens[:need], dtype=np.int64)

    def run_prefill() -> float:
        feeds = model_feeds(session, tokens[None, :prefill])
        t = time.perf_counter()
        session.run(None, feeds)
        return time.perf_counter() - t

    cache_on = DEVICE_CACHE.get(ep)

    def run_decode() -> float:
        return decode_steps(session, tokens, context, decode, device=cache_on)[0]

    result = {"ep": ep, "threads": threads or "ORT default", "session_create_s": round(create_s, 3),
              "warmup": warmup, "repeats": repeats,
              "kv_cache": f"on {cache_on} between steps (IOBinding)" if cache_on else "through host numpy arrays"}
    if prefill:
        for _ in range(warmup):
            run_prefill()
        ms = [run_prefill() * 1e3 for _ in range(repeats)]
        s = _stats(ms)
        result.update(prefill_tokens=prefill, prefill_ms=_round(s), prefill_tok_s=round(prefill / (s["median"] / 1e3), 1))
    if decode:
        for _ in range(warmup):
            run_decode()
        rates = [decode / run_decode() for _ in range(repeats)]
        s = _stats(rates)
        result.update(decode_context=context, decode_tokens=decode, decode_tok_s=_round(s),
                      decode_ms_per_token=round(1e3 / s["median"], 3))
    return result


def decode_steps(session, tokens: np.ndarray, context: int, steps: int, *, device: str | None = None
                 ) -> tuple[float, np.ndarray]:
    """After an untimed prefill of `context` tokens, `steps` one-token steps feeding back the present key/values;
    returns the summed step time and the last logits. With `device` (an ORT device: "cuda", "cpu") the cache stays
    there between steps through IOBinding and only the logits come to the host; without, it goes through numpy."""
    from onnxq.runtime.session import model_feeds

    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    present = {n: n.replace("past_key_values", "present") for n in names if n.startswith("past_key_values")}

    def step_feeds(pos: int) -> dict[str, np.ndarray]:
        feeds = {"input_ids": tokens[None, pos:pos + 1]}
        if "attention_mask" in names:
            feeds["attention_mask"] = np.ones((1, pos + 1), dtype=np.int64)
        if "position_ids" in names:
            feeds["position_ids"] = np.array([[pos]], dtype=np.int64)
        return feeds

    first = model_feeds(session, tokens[None, :context])
    if device is None:
        outs = dict(zip(outputs, session.run(None, first)))
        total = 0.0
        for pos in range(context, context + steps):
            feeds = {**step_feeds(pos), **{p: outs[q] for p, q in present.items()}}
            t = time.perf_counter()
            outs = dict(zip(outputs, session.run(None, feeds)))
            total += time.perf_counter() - t
        return total, outs[outputs[0]]

    def bound_run(feeds: dict[str, np.ndarray], cache: dict | None) -> tuple[float, dict]:
        io = session.io_binding()
        for k, v in feeds.items():
            io.bind_cpu_input(k, np.ascontiguousarray(v))
        for p, q in (present.items() if cache is not None else ()):
            io.bind_ortvalue_input(p, cache[q])
        for o in outputs:
            io.bind_output(o, "cpu" if o == outputs[0] else device)
        t = time.perf_counter()
        session.run_with_iobinding(io)
        spent = time.perf_counter() - t
        return spent, dict(zip(outputs, io.get_outputs()))

    _, cache = bound_run(first, None)
    total = 0.0
    for pos in range(context, context + steps):
        spent, cache = bound_run(step_feeds(pos), cache)
        total += spent
    return total, cache[outputs[0]].numpy()


def _round(s: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="float export with past (or an already transplanted one)")
    ap.add_argument("--quant", help="quantized no-past model to transplant into MODEL first")
    ap.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), help="re-stamp MatMulNBits first")
    ap.add_argument("--work", default="/tmp/onnxq-latency")
    ap.add_argument("--ep", default="cpu")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    try:
        from onnxq.runtime.session import providers_for

        providers_for(args.ep)
        path = Path(args.model)
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        info = {}
        if args.quant:
            info["transplant"] = transplant(args.quant, path, work / "past.onnx")
            path = work / "past.onnx"
        if args.accuracy_level is not None:
            info["restamped"] = restamp(path, work / f"past-acc{args.accuracy_level}.onnx", args.accuracy_level)
            path = work / f"past-acc{args.accuracy_level}.onnx"
        if args.quant:
            ids = (np.arange(16, dtype=np.int64) * 7 + 3)[None] % 200
            info["transplant_rel_l2"] = check_transplant(args.quant, path, ids, ep=args.ep, tol=math.inf if args.accuracy_level is not None else 1e-3)
        info.update(measure(path, ep=args.ep, prefill=args.prefill, context=args.context, decode=args.decode,
                            warmup=args.warmup, repeats=args.repeats, threads=args.threads))
    except OnnxqError as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
