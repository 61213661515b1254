"""Tiny models for tests: random HF Llama / GPT-2 / BERT exported with optimum, one tiny model per family of the
architecture matrix (`tiny_hf`), and hand-built linear-layer graphs.

Exports are made once per process and argument set (in a temp folder removed at exit) and copied into the caller's
`tmp_path`, so tests may modify their copy. The `tiny_*` torch builders give the same weights as the exports.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

_CACHE = Path(tempfile.mkdtemp(prefix="onnxq-tiny-"))
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def tiny_llama(*, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=256, seed=0, tied=False):
    """A random `LlamaForCausalLM` (eval mode, eager attention); same arguments give the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
        attn_implementation="eager", tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def byte_tokenizer(*, bos: bool = False):
    """A byte-level BPE tokenizer with no merges: ids 0/1 are <s>/</s>, then the 256 bytes (vocab 258); with `bos`,
    it puts <s> before every text (a TemplateProcessing post-processor, as Llama's tokenizers do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama_hf(tmp_path: Path, *, tied=True, **kwargs) -> Path:
    """`tiny_llama(vocab=258, tied=...)` saved with `byte_tokenizer()` as a Hugging Face folder in tmp_path."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path, prefix="hf"))
    tiny_llama(vocab=258, tied=tied, **kwargs).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def tiny_gpt2(*, layers=2, hidden=64, heads=4, vocab=256, seed=0):
    """A random `GPT2LMHeadModel` (Conv1D layers, fused QKV, tied embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128, attn_implementation="eager")
    return GPT2LMHeadModel(config).eval()


def tiny_bert(*, layers=2, hidden=64, heads=4, intermediate=128, vocab=256, seed=0):
    """A random `BertModel` encoder."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=128, attn_implementation="eager",
    )
    return BertModel(config).eval()


def tiny_llama_onnx(tmp_path: Path, *, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=256, seed=0,
                    tied=False) -> Path:
    """`tiny_llama(...)` exported by optimum (task text-generation, no KV cache): path of model.onnx in tmp_path.

    With `tied`, the LM head reads Transpose(embedding) (optimum's deduplication of the tied weight)."""
    args = dict(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, intermediate=intermediate, vocab=vocab, seed=seed)
    args |= {"tied": True} if tied else {}
    return _copy(_export("llama", "text-generation", True, tuple(args.items())), Path(tmp_path))


def tiny_gpt2_onnx(tmp_path: Path, *, layers=2, hidden=64, heads=4, vocab=256, seed=0, constant_folding=True) -> Path:
    """`tiny_gpt2(...)` exported (Gemm layers); without constant folding the lm_head reads Transpose(wte)."""
    args = dict(layers=layers, hidden=hidden, heads=heads, vocab=vocab, seed=seed)
    return _copy(_export("gpt2", "text-generation", constant_folding, tuple(args.items())), Path(tmp_path))


def tiny_bert_onnx(tmp_path: Path, *, layers=2, hidden=64, heads=4, intermediate=128, vocab=256, seed=0) -> Path:
    """`tiny_bert(...)` exported with task feature-extraction (MatMul + Add layers)."""
    args = dict(layers=layers, hidden=hidden, heads=heads, intermediate=intermediate, vocab=vocab, seed=seed)
    return _copy(_export("bert", "feature-extraction", True, tuple(args.items())), Path(tmp_path))


@cache
def _export(kind: str, task: str, constant_folding: bool, args: tuple) -> Path:
    from optimum.exporters.onnx import main_export

    build = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}[kind]
    root = Path(tempfile.mkdtemp(dir=_CACHE, prefix=kind))
    build(**dict(args)).save_pretrained(root / "hf")
    main_export(str(root / "hf"), output=root / "onnx", task=task, do_validation=False, do_constant_folding=constant_folding)
    return root / "onnx"


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = Path(tempfile.mkdtemp(dir=tmp_path, prefix=src.parent.name))
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst / "model.onnx"


# ---- the architecture matrix (tests/test_architectures.py) -------------------------------------------------------

_DECODER = dict(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=1)
_GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
# family -> (what it brings, transformers config class, its arguments); sliding windows of 16 are shorter than the
# test windows, so they mask something
ARCHS = {
    "llama": ("Llama", "LlamaConfig", _DECODER),
    "mistral": ("Mistral (sliding window)", "MistralConfig", _DECODER | {"sliding_window": 16}),
    "qwen2": ("Qwen2 (q/k/v biases)", "Qwen2Config", _DECODER),
    "qwen3": ("Qwen3 (QK-norm)", "Qwen3Config", _DECODER | {"head_dim": 16}),
    "phi3": ("Phi-3 (packed qkv and gate_up)", "Phi3Config",
             _DECODER | {"original_max_position_embeddings": 128}),  # = max: the builder's Phi-3-mini-4k form
    "gemma2": ("Gemma-2 (pre+post norms, scaled embedding, soft-capping)", "Gemma2Config", _DECODER | _GEMMA),
    "gemma3_text": ("Gemma-3 (pre+post norms, scaled embedding, QK-norm, local+global layers)", "Gemma3TextConfig",
                    _DECODER | _GEMMA | {"layer_types": ["sliding_attention", "full_attention"]}),
    "gpt2": ("GPT-2 (Conv1D, fused QKV, LayerNorm)", "GPT2Config",
             dict(vocab_size=258, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=1)),
    "bert": ("BERT (encoder, bidirectional)", "BertConfig",
             dict(vocab_size=258, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=128, pad_token_id=1)),
}


def tiny_model(arch: str):
    """A random model of family `arch` (a key of ARCHS; eager attention, eval mode, the same weights every call): a
    causal LM, or BERT's encoder. Norm scales and biases are random too (not ones and zeros), so folding is tested."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    _, name, args = ARCHS[arch]
    config = getattr(transformers, name)(**args, attn_implementation="eager")
    torch.manual_seed(0)
    model = (AutoModel if arch == "bert" else AutoModelForCausalLM).from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_hf(arch: str, tmp_path: Path) -> Path:
    """`tiny_model(arch)` saved with `byte_tokenizer()` as a Hugging Face folder in tmp_path."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path, prefix=arch))
    tiny_model(arch).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def optimum_onnx(hf_folder: Path, out: Path, task: str) -> Path:
    """`hf_folder` exported by optimum with `task` into `out`: path of model.onnx."""
    from optimum.exporters.onnx import main_export

    main_export(str(hf_folder), output=out, task=task, do_validation=False)
    return Path(out) / "model.onnx"


# ---- hand-built graphs -------------------------------------------------------------------------------------------


def matmul_model(dims=(80, 200, 48), *, seed=0) -> onnx.ModelProto:
    """x[batch, seq, dims[0]] -> MatMul "/layers.i/MatMul" (weight [dims[i], dims[i+1]]) -> Relu -> ... -> y."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i, (k, n) in enumerate(zip(dims, dims[1:])):
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), f"layers.{i}.weight"))
        nodes.append(helper.make_node("MatMul", [x, inits[-1].name], [f"/layers.{i}/MatMul_output_0"], name=f"/layers.{i}/MatMul"))
        x = nodes[-1].output[0]
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"/layers.{i}/Relu_output_0"], name=f"/layers.{i}/Relu"))
            x = nodes[-1].output[0]
    nodes[-1].output[0] = "y"
    return _model(nodes, inits, [("x", ["batch", "seq", dims[0]])], [("y", ["batch", "seq", dims[-1]])])


def gemm_model(*, trans_b=0, bias=True, alpha=1.0, beta=1.0, dynamic_bias=False, m=4, k=24, n=16, seed=0) -> onnx.ModelProto:
    """x[m, k] -> Gemm "/fc/Gemm"(x, B, C) -> y[m, n]; B is [k, n] or [n, k] (trans_b), C [n] constant or an input."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [numpy_helper.from_array(b, "fc.weight")]
    inputs = [("x", [m, k])]
    if bias and dynamic_bias:
        inputs.append(("c", [n]))
    elif bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "c"))
    node = helper.make_node("Gemm", ["x", "fc.weight"] + (["c"] if bias else []), ["y"], name="/fc/Gemm",
                            transB=trans_b, alpha=alpha, beta=beta)
    return _model([node], inits, inputs, [("y", [m, n])])


def transpose_weight_model(*, k=24, n=16, constant=False, seed=0) -> onnx.ModelProto:
    """x[2, k] -> MatMul "/fc/MatMul"(x, Transpose(W[n, k])) -> y; W an initializer or (constant=True) a Constant node."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["fc.weight"], ["/fc/Transpose_output_0"], name="/fc/Transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "/fc/Transpose_output_0"], ["y"], name="/fc/MatMul"),
    ]
    inits = [numpy_helper.from_array(w, "fc.weight")]
    if constant:
        nodes.insert(0, helper.make_node("Constant", [], ["fc.weight"], name="/fc/Constant", value=inits.pop()))
    return _model(nodes, inits, [("x", [2, k])], [("y", [2, n])])


def constant_weight_model(*, k=24, n=16, seed=0) -> onnx.ModelProto:
    """x[2, k] -> MatMul "/fc/MatMul"(x, Constant W[k, n]) -> y."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["/fc/Constant_output_0"], name="/fc/Constant", value=numpy_helper.from_array(w)),
        helper.make_node("MatMul", ["x", "/fc/Constant_output_0"], ["y"], name="/fc/MatMul"),
    ]
    return _model(nodes, [], [("x", [2, k])], [("y", [2, n])])


def tied_embedding_model(*, vocab=32, hidden=16, seed=0) -> onnx.ModelProto:
    """ids[2, 5] -> Gather(E[vocab, hidden]) -> MatMul "/lm_head/MatMul"(., Transpose(E)) -> logits (E shared)."""
    e = np.random.default_rng(seed).standard_normal((vocab, hidden)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["embed.weight", "ids"], ["h"], name="/embed/Gather"),
        helper.make_node("Transpose", ["embed.weight"], ["/lm_head/Transpose_output_0"], name="/lm_head/Transpose"),
        helper.make_node("MatMul", ["h", "/lm_head/Transpose_output_0"], ["logits"], name="/lm_head/MatMul"),
    ]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])]
    return _model(nodes, [numpy_helper.from_array(e, "embed.weight")], inputs, [("logits", [2, 5, vocab])])


def _model(nodes, inits, inputs, outputs, opset=18) -> onnx.ModelProto:
    def info(x):
        return x if isinstance(x, onnx.ValueInfoProto) else helper.make_tensor_value_info(x[0], TensorProto.FLOAT, x[1])

    graph = helper.make_graph(nodes, "tiny", [info(x) for x in inputs], [info(y) for y in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
