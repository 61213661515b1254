"""Graph -> graph rewrites (imported as `onnxq.passes`): normalize, quantized-weight rewrites, provenance metadata."""
from .metadata import add_provenance, read_provenance
from .normalize import normalize
from .rewrite import QuantizedWeight, add_output_bias, to_matmulnbits, to_qdq

__all__ = ["QuantizedWeight", "add_output_bias", "add_provenance", "normalize", "read_provenance", "to_matmulnbits", "to_qdq"]
