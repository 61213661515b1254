"""Load a generation-ready folder with onnxruntime-genai and generate greedily: the check after writing, and
`onnxq generate`."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from onnxq.errors import OnnxqError


@dataclass
class Generation:
    """What one greedy generation produced and how fast."""

    prompt: str
    text: str
    tokens: list[int]
    load_s: float
    prefill_s: float
    decode_tok_s: float  # generated tokens after the first / their time (batch 1, KV cache)

    def line(self) -> str:
        """One line for the terminal."""
        return (f"{self.prompt!r} -> {self.text!r} ({len(self.tokens)} tokens, {self.decode_tok_s:.1f} tok/s decode, "
                f"onnxruntime-genai)")


def generate(folder: str | Path, prompt: str, *, max_new_tokens: int = 32) -> Generation:
    """Greedy generation of up to `max_new_tokens` tokens after `prompt` with onnxruntime-genai's own tokenizer."""
    import onnxruntime_genai as og

    folder = Path(folder)
    if not (folder / "genai_config.json").is_file():
        raise OnnxqError(f"{folder} is not a generation-ready folder (no genai_config.json): give a folder written by "
                         "onnxq quantize -o DIR")
    t0 = time.perf_counter()
    try:
        model = og.Model(str(folder))
        tokenizer = og.Tokenizer(model)
    except Exception as err:  # onnxruntime-genai raises plain RuntimeErrors with multi-line texts
        raise OnnxqError(f"onnxruntime-genai cannot load {folder} ({' '.join(str(err).split())[:200]}): "
                         "write the folder again with onnxq quantize -o DIR") from None
    load_s = time.perf_counter() - t0
    ids = tokenizer.encode(prompt)
    if len(ids) == 0:
        raise OnnxqError("the prompt encodes to no tokens: give a non-empty prompt")
    params = og.GeneratorParams(model)
    window = (json.loads((folder / "genai_config.json").read_text())["model"]["decoder"].get("sliding_window") or {})
    # a sliding-window attention layer (Gemma-2) needs a KV cache of at least the window: the loop below still stops
    params.set_search_options(max_length=max(len(ids) + max_new_tokens, window.get("window_size", 0)), do_sample=False)
    generator = og.Generator(model, params)
    t = time.perf_counter()
    generator.append_tokens(ids)
    out, stamps = [], []
    while not generator.is_done() and len(out) < max_new_tokens:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
        stamps.append(time.perf_counter())
    prefill_s = stamps[0] - t if stamps else 0.0
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return Generation(prompt, tokenizer.decode(out), out, round(load_s, 2), round(prefill_s, 4), round(rate, 1))
