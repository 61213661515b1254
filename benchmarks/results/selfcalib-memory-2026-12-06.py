"""Peak RSS of `--calib self`'s sampling (16 x 512 tokens, seed 0) with three changes tried on 2026-12-06:
the with-past graph's weights in a `.data` file beside it (ext), plus IO binding that keeps the KV cache in ONNX
Runtime between steps (ext-iob), plus no CPU memory arena (ext-iob-noarena); and the shipped sampler without the
arena (noarena). One-off probe; run each in a fresh
process:

    python benchmarks/results/selfcalib-memory-2026-12-06.py prepare   # once: the external-data copy
    python benchmarks/results/selfcalib-memory-2026-12-06.py ext|ext-iob|ext-iob-noarena|noarena

`prepare` writes the cached with-past export with its weights in a `.data` file to /tmp/onnxq-pastx (tokenizer files
copied); it is a step of its own so that no measured run pays for it. The 2026-12-06 runs used the same copy made by
hand with the same `onnx.save_model` call."""
import hashlib, os, resource, shutil, sys
from pathlib import Path
import onnx
import numpy as np
import onnxruntime as ort
from functools import partial
import onnxq.calibrate.selfcalib as sc
import onnxq.runtime.session as S
mode = sys.argv[1]  # prepare | ext | ext-iob | ext-iob-noarena | noarena
PASTX = Path("/tmp/onnxq-pastx")
if mode == "prepare":
    past = sc.generation_graph("smollm2")
    PASTX.mkdir(exist_ok=True)
    for f in past.parent.iterdir():
        if f.name != "model.onnx":
            shutil.copy(f, PASTX / f.name)
    onnx.save_model(onnx.load(past), PASTX / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    sys.exit()
if mode.startswith("ext"):
    sc.generation_graph = lambda src: PASTX / "model.onnx"
if "noarena" in mode:
    S.make_session = partial(S.make_session, arena=False)
if "iob" in mode:
    def _cached(session):
        names = {i.name for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        present = {n: n.replace("past_key_values", "present") for n in names if n.startswith("past_key_values")}
        state = {}
        def step(ids):
            b, pos = len(ids), state.get("pos", 0)
            feeds = S.model_feeds(session, ids[:, None])
            io = session.io_binding()
            if pos:
                now = {"attention_mask": np.ones((b, pos + 1)), "position_ids": np.full((b, 1), pos)}
                feeds |= {k: v.astype(feeds[k].dtype) for k, v in now.items() if k in feeds}
            for k, v in feeds.items():
                if pos and k in present:
                    io.bind_ortvalue_input(k, state["past"][k])
                else:
                    io.bind_cpu_input(k, v)
            for o in outputs:
                io.bind_output(o, "cpu")
            session.run_with_iobinding(io)
            outs = dict(zip(outputs, io.get_outputs()))
            logits = outs[outputs[0]].numpy()[:, -1].copy()
            state.update(pos=pos + 1, past={p: outs[q] for p, q in present.items()})
            del io, outs
            return logits
        return step
    sc._cached_stepper = _cached
windows, seconds = sc.generate_windows("smollm2", 16, 512, seed=0)
print(mode, f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, {seconds:.1f} s, sha1 {hashlib.sha1(windows.tobytes()).hexdigest()[:12]}", flush=True)
