"""onnxruntime-genai's model builder as onnxq's deployment front-end, run in its own environment.

The builder (onnxruntime-genai 0.18) imports transformers 5 classes at start-up, while the analysis export (optimum-onnx
0.1) needs transformers < 4.58; so the builder lives in `.venv-genai` (made by scripts/setup.sh) and runs as a
subprocess, as the OpenVINO check does. Its float graph (GroupQueryAttention, fused norms, packed QKV, KV cache) is
cached per Hugging Face folder; onnxq writes its solved weights into it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from onnxq.errors import OnnxqError

# Text decoders the 0.18 builder dispatches on (builder.py: `config.architectures[0] == ...`); its multimodal, MoE
# and speech entries are left to the .onnx path, as are the architectures it does not know
BUILDER_ARCHITECTURES = (
    "Ernie4_5ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GraniteForCausalLM",
    "HunYuanDenseV1ForCausalLM", "InternLM2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "NemotronForCausalLM",
    "OlmoForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "SmolLM3ForCausalLM",
)


def genai_python() -> Path:
    """The Python of the builder's environment: `$ONNXQ_GENAI_PYTHON`, else `.venv-genai` beside this `.venv`."""
    env = os.environ.get("ONNXQ_GENAI_PYTHON")
    path = Path(env) if env else Path(sys.prefix).parent / ".venv-genai" / "bin" / "python"
    if not path.is_file():
        raise OnnxqError(f"onnxruntime-genai's model builder needs its own environment (transformers 5), not found at "
                         f"{path}: run ./scripts/setup.sh or set ONNXQ_GENAI_PYTHON to a Python that has it")
    return path


def builder_supports(hf_folder: Path) -> str | None:
    """None if the builder can build this Hugging Face folder's model, else why not (one phrase)."""
    config = Path(hf_folder) / "config.json"
    if not config.is_file():
        return "no config.json (not a Hugging Face folder)"
    architecture = (json.loads(config.read_text()).get("architectures") or [None])[0]
    if architecture not in BUILDER_ARCHITECTURES:
        return f"architecture {architecture!r} is not a text decoder the onnxruntime-genai builder handles"
    return None


def run_builder(hf_folder: Path, out: Path, *, precision: str = "fp32", ep: str = "cpu",
                extra_options: dict[str, str] | None = None) -> Path:
    """`python -m onnxruntime_genai.models.builder -i hf_folder -o out -p precision -e ep`; returns `out`.

    `out` must not exist; a failed build leaves nothing there and raises one line with the builder's last message.
    """
    out = Path(out)
    cache = out.parent / f".{out.name}.builder-cache"
    cmd = [str(genai_python()), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
           "-p", precision, "-e", ep, "-c", str(cache)]
    if extra_options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        _remove(cache)
    if done.returncode != 0 or not (out / "model.onnx").is_file():
        _remove(out)
        lines = [l for l in (done.stdout + done.stderr).strip().splitlines() if l.strip()]  # a traceback's last line
        raise OnnxqError(f"onnxruntime-genai's model builder failed on {hf_folder} ({lines[-1][:200] if lines else 'no output'}): "
                         "check that the model is one it supports, or write a single .onnx file (-o FILE.onnx)")
    return out


def float_build(hf_folder: Path) -> Path:
    """The builder's fp32 CPU graph of `hf_folder`, built once and cached; returns its folder."""
    from onnxq.graph.io import atomic_dir
    from onnxq.models.export import _fingerprint
    from onnxq.models.registry import cache_dir

    hf_folder = Path(hf_folder)
    why = builder_supports(hf_folder)
    if why:
        raise OnnxqError(f"{hf_folder}: {why}: write a single .onnx file instead (-o FILE.onnx)")
    final = cache_dir() / "genai" / f"{hf_folder.name}-{_fingerprint(hf_folder)}-fp32"
    if (final / "model.onnx").is_file():
        return final
    with atomic_dir(final) as tmp:
        run_builder(hf_folder, tmp / "build")
        for p in (tmp / "build").iterdir():
            p.rename(tmp / p.name)
        (tmp / "build").rmdir()
    return final


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
