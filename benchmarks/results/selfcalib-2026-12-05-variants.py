"""W3 g128 TurboBoA data-free variants on smollm2 (the one-off experiment of selfcalib-2026-12-05-variants.md).

    python benchmarks/results/selfcalib-2026-12-05-variants.py NAME BITS GROUP JSON-OPTIONS

NAME sotu*: the SOTU-text reference (sotu-calib, quantize's own window sampling) with OPTIONS' n windows.

Ran from /tmp/s6 as exp.py; only its paths were changed here (outputs under out/selfcalib-variants/)."""
import os
import json, sys, time
import numpy as np
from onnxq.calibrate import selfcalib as sc
from onnxq.models.export import load_tokenizer
from onnxq.runtime.session import make_session
from onnxq.pipeline import quantize
from onnxq.recipe import QuantRecipe
from onnxq.report import evaluate

def gen(n, seed, greedy=0, keep=None, temp=1.0, prompt=None, start_ids=None, drop=0, top_p=1.0, min_p=0.0,
        temp_from=None, temp_over=0):
    """n windows; first sampled token then `greedy` argmax tokens; keep: of n, the `keep` nearest the median NLL;
    start_ids: every window starts with these ids; drop: sample 512 + drop ids, then drop the first `drop` columns;
    top_p: sample within the smallest set of ids holding that much probability (nucleus); min_p: only ids with at
    least min_p times the top id's probability (both after the temperature); temp_from, temp_over: the temperature
    goes linearly from temp_from at the first sampled token to temp at token temp_over (the schedule of Williams et
    al., self-calibration, NAACL 2025)."""
    t0 = time.perf_counter()
    path = sc.generation_graph("smollm2"); tok = load_tokenizer(path)
    rng = np.random.default_rng(seed)
    starts = sc.start_tokens(tok, n, rng) if prompt is None else [tok(prompt, add_special_tokens=False)['input_ids']] * n
    starts = [list(start_ids)] * n if start_ids is not None else starts
    step = sc.make_stepper(make_session(path, "cpu"), 512 + drop)
    banned = [*sc.banned_ids(tok), *range(len(tok), 49152)]
    t = {"i": 0}; nll = np.zeros(n)
    def pick(logits):
        t["i"] += 1
        z = logits.astype(np.float64); z[:, [b for b in banned if b < z.shape[1]]] = -np.inf
        if 2 <= t["i"] <= 1 + greedy:
            ids = z.argmax(1)
        else:
            done = min(t["i"] - 1, temp_over) / temp_over if temp_over else 1.0  # share of the schedule run
            tt = temp if temp_from is None else temp_from + done * (temp - temp_from)
            ids = sc.sample(truncate(z / tt, top_p, min_p), rng, temperature=1.0, top_k=0, banned=banned)
        lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        nll[:] += lse - z[np.arange(n), ids]
        return ids
    w = sc.decode(step, starts, 512 + drop, pick)[:, drop:]
    per = nll / (511 + drop)
    print("window NLL/token:", np.round(np.sort(per), 2).tolist(), flush=True)
    if keep:
        order = np.argsort(np.abs(per - np.median(per)))[:keep]
        w = w[np.sort(order)]
    return w, time.perf_counter() - t0, tok

def truncate(z, top_p, min_p):
    """Logits [b, V] with the ids outside the nucleus (top_p) or under min_p x the top probability set to -inf."""
    p = np.exp(z - z.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    out = z.copy()
    if min_p > 0:
        out[p < min_p * p.max(1, keepdims=True)] = -np.inf
    if top_p < 1:
        order = np.argsort(-p, axis=1)
        ps = np.take_along_axis(p, order, axis=1)
        drop = np.cumsum(ps, axis=1) - ps >= top_p  # ids after the nucleus is already full
        np.put_along_axis(out, order, np.where(drop, -np.inf, np.take_along_axis(out, order, axis=1)), axis=1)
    return out

os.makedirs("out/selfcalib-variants", exist_ok=True)
name, bits, group = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kw = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
n = kw.pop("n", 16)
algo = kw.pop("algo", "turboboa")  # the solver on both sides (TurboBoA unless set)
extra = kw.pop("recipe", {})  # more QuantRecipe fields, e.g. {"rotate": true}
if name.startswith("pydoc"):
    import pydoc_data.topics as T
    from onnxq.calibrate.textdata import token_windows
    from onnxq.calibrate.selfcalib import generation_graph
    tok = load_tokenizer(generation_graph("smollm2"))
    text = "\n\n".join(T.topics[k] for k in sorted(T.topics))
    windows, g = token_windows(tok, text, 512, n, seed=0, random=True), 0.0
elif name.startswith("sotu"):  # the SOTU-text reference with n windows (quantize's own sampling of sotu-calib)
    windows, g = None, 0.0
else:
    windows, g, tok = gen(n, **kw)
    open(f"out/selfcalib-variants/{name}.txt", "w").write(sc.windows_text(tok, windows))
t0 = time.perf_counter()
rep = quantize("smollm2", QuantRecipe(algo=algo, bits=bits, group_size=group, calib_windows=len(windows) if windows is not None else n, **extra),
               f"out/selfcalib-variants/{name}.onnx", windows=windows, progress=False)
ppl = evaluate(rep.model, f"out/selfcalib-variants/{name}.onnx").quant.ppl
row = dict(name=name, algo=algo, bits=bits, group=group, kw=sys.argv[4] if len(sys.argv) > 4 else "", n=n, ppl=round(ppl, 3), gen_s=round(g), quant_s=round(rep.total_seconds))
print(json.dumps(row), flush=True)
open("out/selfcalib-variants/rows.jsonl", "a").write(json.dumps(row) + "\n")
