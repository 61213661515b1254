"""Model registry, GGUF → Hugging Face → ONNX export (cached) and the vendored SOTU text."""
from .export import export_onnx, hf_folder, load_tokenizer, resolve_model
from .registry import REGISTRY, cache_dir

__all__ = ["REGISTRY", "cache_dir", "export_onnx", "hf_folder", "load_tokenizer", "resolve_model"]
