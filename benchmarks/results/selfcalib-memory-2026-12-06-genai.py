"""`--calib self`'s sampler driven through onnxruntime-genai on the builder's float folder (one-off probe, 2026-12-06).

    python benchmarks/results/selfcalib-memory-2026-12-06-genai.py N SEQ_LEN

Same starts, banned ids and `selfcalib.sample` as the shipped sampler, seed 0. onnxruntime-genai takes tokens from the
caller only once per batch (`append_tokens`), so every later token is forced through the search: the chosen id's
logit is set to 0 and every other to -1e9, and greedy search picks it. The windows are checked against
`generator.get_sequence`. The builder's float folder must be cached (the main job builds it)."""
import glob, resource, time, hashlib, sys
import numpy as np, onnxruntime_genai as og
from onnxq.calibrate import selfcalib as sc
from onnxq.models.export import load_tokenizer
from onnxq.models.registry import cache_dir
folder = sorted(glob.glob(str(cache_dir() / "genai" / "smollm2-*-fp32")))[0]
n, L = int(sys.argv[1]), int(sys.argv[2])
t0 = time.perf_counter()
model = og.Model(folder)
params = og.GeneratorParams(model)
params.set_search_options(batch_size=n, max_length=L, do_sample=False)
gen = og.Generator(model, params)
tok = load_tokenizer(sc.generation_graph("smollm2"))
rng = np.random.default_rng(0)
starts = sc.start_tokens(tok, n, rng)
banned = [*sc.banned_ids(tok), *range(len(tok), 49152)]
state = {"first": True}
def step(ids):
    if state.pop("first", False):
        gen.append_tokens(ids[:, None].astype(np.int32))
    else:
        onehot = np.full((len(ids), 1, 49152), -1e9, np.float32)
        onehot[np.arange(len(ids)), 0, ids] = 0.0
        gen.set_logits(onehot)
        gen.generate_next_token()
    return gen.get_logits()[:, -1]
def pick(logits):
    return sc.sample(logits, rng, temperature=1.0, top_k=0, banned=banned)
w = sc.decode(step, starts, L, pick)
seq = np.stack([np.asarray(gen.get_sequence(i)) for i in range(n)])
print("sequences agree", seq.shape, np.array_equal(seq[:, :L-1], w[:, :L-1]))
print(n, L, f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MiB {time.perf_counter()-t0:.1f} s", hashlib.sha1(w.tobytes()).hexdigest()[:12])
print(sc.windows_text(tok, w[:2])[:600])
