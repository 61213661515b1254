# Weights and graph (metadata aside) of a tiny Llama quantized with 15 recipes: run from a checkout, PYTHONPATH=. python identity.py
# (before the house move, commit 2dbd4e3, symlink passes/ runtime/ models/ into onnxq/ first: it relied on package-dir).
import hashlib, sys, tempfile, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import numpy as np
from onnxq.pipeline import quantize
from onnxq.recipe import QuantRecipe
from tests.tiny import tiny_llama_onnx
tmp = Path(tempfile.mkdtemp())
model = tiny_llama_onnx(tmp, layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=256)
rng = np.random.default_rng(0)
windows = rng.integers(0, 256, size=(4, 64))
R = dict(
  rtn=dict(algo="rtn"), rtn_qdq=dict(algo="rtn", format="qdq", bits=8),
  gptq=dict(algo="gptq"), gptq3=dict(algo="gptq", bits=3, group_size=32),
  boa=dict(algo="boa"), turbo=dict(algo="turboboa"), aespa=dict(algo="aespa"),
  turbo2=dict(algo="turboboa", bits=2, group_size=64, float_zero=True, refine_codes=1),
  tune=dict(algo="gptq", block_tune=2), tseq=dict(algo="turboboa", true_sequential=True),
  rot=dict(algo="gptq", rotate=True, bias_correction=True), gso=dict(algo="gptq", refine_scales=True),
  upf=dict(algo="turboboa", up_row_factor=True, v_row_factor=True), perch=dict(algo="gptq", group_size=-1, sym=True),
  size=dict(algo="gptq", bpw=3.5, group_size=32),
)
for name, kw in R.items():
    out = tmp / f"{name}.onnx"
    try:
        quantize(str(model), QuantRecipe(calib_windows=4, calib_seq_len=64, **kw), out, windows=windows, progress=False)
        import onnx
        m = onnx.load(str(out))
        del m.metadata_props[:]
        m.producer_version = ""
        wts = hashlib.sha256(b"".join(onnx.numpy_helper.to_array(t).tobytes() for t in m.graph.initializer)).hexdigest()[:12]
        h = wts + " graph " + hashlib.sha256(m.SerializeToString()).hexdigest()[:12]
    except Exception as e:
        h = "ERR " + repr(e)[:100]
    print(name, h, flush=True)
