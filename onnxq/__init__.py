"""onnxq: ONNX graph-level post-training weight quantization (RTN, GPTQ, BoA, TurboBoA) for ONNX Runtime."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import OnnxqError  # noqa: E402
from .recipe import QuantRecipe  # noqa: E402


def quantize(model, output, recipe: QuantRecipe | None = None, **kwargs):
    """Quantize a model (.onnx, HF folder or registry name) to `output`; see `onnxq.pipeline.quantize`."""
    from .pipeline import quantize as _quantize

    return _quantize(model, recipe or QuantRecipe(), output, **kwargs)


def evaluate(float_model, quant_model=None, **kwargs):
    """Perplexity, output error, size of a float and a quantized model; see `onnxq.report.evaluate`."""
    from .report import evaluate as _evaluate

    return _evaluate(float_model, quant_model, **kwargs)


__all__ = ["OnnxqError", "QuantRecipe", "quantize", "evaluate", "__version__"]
