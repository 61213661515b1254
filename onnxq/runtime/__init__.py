"""ONNX Runtime sessions and providers, perplexity, output error and model size."""
from .evaluate import file_size, output_error, perplexity
from .session import make_session, model_feeds, providers_for

__all__ = ["file_size", "make_session", "model_feeds", "output_error", "perplexity", "providers_for"]
