# The two --bits-floor rows of mixed-2026-12-04 were added to the run's file by these scripts (same machine, after
# the run; quantized with: onnxq quantize smollm2 -o OUT [--head-bits 4 --head-group 32] --size-mb S).
import json, sys
from pathlib import Path
from benchmarks.mixed import _write
from benchmarks.deploy import _put
from onnxq.calibrate.textdata import load_text, token_windows
from onnxq.models.export import export_onnx, load_tokenizer
from onnxq.runtime.evaluate import file_size, perplexity
folder = Path("/tmp/wt/out/mixed86-floor4")
windows = token_windows(load_tokenizer(export_onnx("smollm2")), load_text("sotu-eval"), 512, 8)
stem = Path("benchmarks/results/mixed-2026-12-04")
result = json.loads(stem.with_suffix(".json").read_text())
alloc = json.loads(Path("/tmp/wt/out/mixed86-floor4.json").read_text()) if Path("/tmp/wt/out/mixed86-floor4.json").is_file() else {}
def find(x):
    if isinstance(x, dict):
        if "allocation" in x: return x["allocation"]
        for v in x.values():
            r = find(v)
            if r: return r
row = {"name": "onnxq mixed @ int4 size, head int4 g32, no 2-bit (floor = --bits)", "quant_s": 317.3,
       "command": "onnxq quantize smollm2 -o OUT --head-bits 4 --head-group 32 --size-mb 86.513 (candidates >= --bits 4; added after the run, same machine, scored by the same code: python /tmp/mv/addrow.py)",
       "ppl": round(perplexity(folder / "model.onnx", windows), 3), "size_mb": round(file_size(folder / "model.onnx") / 1e6, 3),
       "allocation": find(alloc) or {}}
for r in result["rows"]:
    p = Path(f"out/mixed-bench/{r['name'].replace(' ', '-').replace(',', '').replace('@', 'at')}.json")
    if p.is_file() and not r.get("allocation"):
        r["allocation"] = find(json.loads(p.read_text())) or {}
_put(result["rows"], row)
print(row)
_write(stem, result)

# ---- second row: the same with these substitutions
# > folder = Path("/tmp/wt/out/mixed113-floor4") > alloc = json.loads(Path("/tmp/wt/out/mixed113-floor4.json").read_text()) if Path("/tmp/wt/out/mixed113-floor4.json").is_file() else {} > row = {"name": "onnxq mixed @ k_quant_mixed size, no 2-bit (floor = --bits)", "quant_s": 375.8, 
