"""W3 g128 TurboBoA on smollm2 calibrated three ways, each scored on three texts (selfcalib-2026-12-05-crossdomain.md).

    python benchmarks/results/selfcalib-2026-12-05-crossdomain.py

Calibrations: the SOTU text (sotu-calib), the model's own samples (`--calib self`, the shipped sampler) and Python's
reference docs (pydoc_data.topics, random windows). Texts scored: sotu-eval, the first 4096 tokens of the GNU GPL v3
(/usr/share/common-licenses/GPL-3, legal prose) and of the pydoc text (the pydoc-calibrated model saw windows of it)."""
import json
import os
import time

import pydoc_data.topics as topics
from onnxq.calibrate.selfcalib import generation_graph
from onnxq.calibrate.textdata import token_windows
from onnxq.models.export import load_tokenizer
from onnxq.pipeline import quantize
from onnxq.recipe import QuantRecipe
from onnxq.report import evaluate

OUT = "out/selfcalib-crossdomain"
os.makedirs(OUT, exist_ok=True)
pydoc_text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
open(f"{OUT}/pydoc.txt", "w").write(pydoc_text)
texts = {"sotu-eval": "sotu-eval", "gpl-3": "/usr/share/common-licenses/GPL-3", "pydoc": f"{OUT}/pydoc.txt"}
recipe = QuantRecipe(algo="turboboa", bits=3, group_size=128)
rows = []
model = None
for calib in ("sotu-calib", "self", "pydoc"):
    path, t0 = f"{OUT}/{calib}.onnx", time.perf_counter()
    if calib == "pydoc":
        windows = token_windows(load_tokenizer(generation_graph("smollm2")), pydoc_text, 512, 16, seed=0, random=True)
        rep = quantize("smollm2", recipe, path, windows=windows, progress=False)
    else:
        rep = quantize("smollm2", recipe, path, calib=calib, progress=False)
    model, quant_s = rep.model, round(time.perf_counter() - t0)
    for name, text in texts.items():
        ppl = evaluate(None, path, text=text, tokenizer_from=model).quant.ppl
        rows.append(dict(calib=calib, text=name, ppl=round(ppl, 3), quant_s=quant_s))
        print(json.dumps(rows[-1]), flush=True)
for name, text in texts.items():
    rows.append(dict(calib="float", text=name, ppl=round(evaluate(model, None, text=text).float.ppl, 3)))
    print(json.dumps(rows[-1]), flush=True)
with open(f"{OUT}/rows.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
