"""On a CUDA machine: the solvers on torch CUDA match the CPU, and the CUDA EP matches the CPU EP (skipped elsewhere)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from onnxq import QuantRecipe
from onnxq.pipeline import quantize
from onnxq.runtime.evaluate import perplexity
from tests.tiny import tiny_llama_onnx

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.parametrize("algo", ["gptq", "boa", "turboboa"])
def test_cuda_solvers_match_cpu(tmp_path, algo):
    model = tiny_llama_onnx(tmp_path)
    rng = np.random.default_rng(0)
    calib, evalw = rng.integers(0, 256, (8, 64)), rng.integers(0, 256, (4, 64))
    ep = "cuda" if CUDA_EP else "cpu"
    ppl = {}
    for dev in ("cpu", "cuda"):
        out = tmp_path / f"{dev}.onnx"
        quantize(model, QuantRecipe(algo=algo, bits=4, group_size=32, device=dev), out, windows=calib, ep=ep, progress=False)
        ppl[dev] = perplexity(out, evalw, "cpu")
    assert ppl["cuda"] == pytest.approx(ppl["cpu"], rel=1e-4)


@pytest.mark.skipif(not CUDA_EP, reason="needs onnxruntime-gpu")
def test_cuda_ep_matches_cpu_ep(tmp_path):
    model = tiny_llama_onnx(tmp_path)
    out = tmp_path / "q.onnx"
    rng = np.random.default_rng(1)
    quantize(model, QuantRecipe(algo="rtn", bits=4, group_size=32), out, windows=rng.integers(0, 256, (4, 32)), progress=False)
    evalw = rng.integers(0, 256, (4, 64))
    for path in (model, out):
        assert perplexity(path, evalw, "cuda") == pytest.approx(perplexity(path, evalw, "cpu"), rel=1e-4)
