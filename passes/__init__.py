"""Graph -> graph rewrites (imported as `onnxq.passes`): normalize, quantized-weight rewrites, provenance metadata."""
from .metadata import add_provenance, read_provenance
from .normalize import normalize
from .rewrite import QuantizedWeight, to_matmulnbits, to_qdq

__all__ = ["QuantizedWeight", "add_provenance", "normalize", "read_provenance", "to_matmulnbits", "to_qdq"]
