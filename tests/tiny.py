"""Tiny models for tests: random HF Llama / GPT-2 / BERT exported with optimum, one tiny model per family of the
architecture matrix (`tiny_hf`), byte-level tokenizers, hand-built linear-layer graphs, and a hand-built Llama-like
decoder of any size (`decoder_model`, weights inline or streamed to external data) with CLI-ready copies of it.

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


def write_byte_tokenizer(folder: Path) -> None:
    """Write folder/tokenizer.json whose 256 tokens are the bytes (byte-level BPE, no merges, token id = byte value,
    no special tokens): ids fit a 256 vocab. (`byte_tokenizer()` is the 258-id one with <s> and </s>.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    b2u = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))


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


# ---- a hand-built Llama-like decoder -----------------------------------------------------------------------------

_ALIGN = 4096


class _Weights:
    """Creates initializers: inline tensors, or tensors appended to an external data file (page-aligned)."""

    def __init__(self, seed: int, external: Path | None, location: str = "model.onnx.data"):
        self.rng = np.random.default_rng(seed)
        self.tensors: list[TensorProto] = []
        self.location = location
        self.file = open(external / location, "wb") if external is not None else None

    def random(self, name: str, shape: tuple[int, ...], scale: float) -> str:
        """A standard-normal float32 tensor times `scale`, added as `name`."""
        return self.add(name, (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)))

    def add(self, name: str, value: np.ndarray) -> str:
        """`value` as initializer `name`: inline below 1 KiB or without a file, else appended to the file."""
        value = np.ascontiguousarray(value)
        if self.file is None or value.nbytes < 1024:
            self.tensors.append(numpy_helper.from_array(value, name))
            return name
        offset = -(-self.file.tell() // _ALIGN) * _ALIGN
        self.file.seek(offset)
        self.file.write(value.tobytes())
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype), dims=value.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, val in (("location", self.location), ("offset", str(offset)), ("length", str(value.nbytes))):
            t.external_data.add(key=key, value=val)
        self.tensors.append(t)
        return name

    def close(self) -> None:
        """Close the external data file, if any."""
        if self.file is not None:
            self.file.close()


def decoder_model(
    *, layers=2, hidden=32, heads=4, intermediate=64, vocab=64, seed=0, external: Path | None = None,
    zero_input_layer: bool = False, rank1_input_layer: bool = False,
) -> onnx.ModelProto:
    """A Llama-like decoder built with onnx.helper only: input_ids -> Gather embedding -> `layers` blocks named like
    optimum's exports (`/model/layers.N/...`: LayerNorm, q/k/v/o projections with unfused multi-head softmax attention,
    LayerNorm, SiLU-gated MLP, residual adds) -> final LayerNorm -> `/lm_head/MatMul` -> logits. With `external`,
    every weight is written straight to `external/model.onnx.data` (page-aligned, one tensor at a time).

    `zero_input_layer` feeds block 0's up_proj an all-zero activation (H = 0); `rank1_input_layer` feeds block 0's
    gate_proj a rank-1 activation (every feature equals the row mean), so its Hessian is singular.
    """
    d = hidden // heads
    w = _Weights(seed, external)
    f32 = lambda v: np.asarray(v, dtype=np.float32)  # noqa: E731
    i64 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    nodes: list[onnx.NodeProto] = []

    def node(op, inputs, name, **attrs):
        out = f"{name}_output_0"
        nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    shared = {  # Constant nodes, as exporters write them (shape inference then sees the head split)
        key: node("Constant", [], f"/model/Constant_{key}", value=numpy_helper.from_array(value))
        for key, value in (("heads_shape", i64([0, 0, heads, d])), ("merge_shape", i64([0, 0, hidden])),
                           ("scale", f32(1.0 / np.sqrt(d))), ("zero", f32(0.0)), ("last_axis", i64([-1])))
    }

    def norm(x, prefix):
        scale = w.add(f"{prefix}.weight", f32(np.ones(hidden)))
        bias = w.add(f"{prefix}.bias", f32(np.zeros(hidden)))
        return node("LayerNormalization", [x, scale, bias], f"{prefix}/LayerNormalization", axis=-1, epsilon=1e-5)

    def linear(x, prefix, k, n):
        wname = w.random(f"{prefix}.weight", (k, n), 1.0 / np.sqrt(k))
        return node("MatMul", [x, wname], f"{prefix}/MatMul")

    embed = w.random("model.embed_tokens.weight", (vocab, hidden), 1.0)
    h = node("Gather", [embed, "input_ids"], "/model/embed_tokens/Gather")
    for i in range(layers):
        p = f"/model/layers.{i}"
        x = norm(h, f"{p}/input_layernorm")
        q, k, v = (linear(x, f"{p}/self_attn/{r}_proj", hidden, hidden) for r in "qkv")
        split = lambda t, r: node("Reshape", [t, shared["heads_shape"]], f"{p}/self_attn/{r}/Reshape")  # noqa: E731
        q = node("Transpose", [split(q, "q")], f"{p}/self_attn/q/Transpose", perm=[0, 2, 1, 3])
        k = node("Transpose", [split(k, "k")], f"{p}/self_attn/k/Transpose", perm=[0, 2, 3, 1])
        v = node("Transpose", [split(v, "v")], f"{p}/self_attn/v/Transpose", perm=[0, 2, 1, 3])
        s = node("Mul", [node("MatMul", [q, k], f"{p}/self_attn/MatMul"), shared["scale"]], f"{p}/self_attn/Mul")
        probs = node("Softmax", [s], f"{p}/self_attn/Softmax", axis=-1)
        ctx = node("MatMul", [probs, v], f"{p}/self_attn/MatMul_1")
        ctx = node("Transpose", [ctx], f"{p}/self_attn/Transpose_1", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, shared["merge_shape"]], f"{p}/self_attn/Reshape_1")
        h = node("Add", [h, linear(ctx, f"{p}/self_attn/o_proj", hidden, hidden)], f"{p}/Add")
        x = norm(h, f"{p}/post_attention_layernorm")
        x_gate, x_up = x, x
        if i == 0 and rank1_input_layer:
            x_gate = node("Expand", [node("ReduceMean", [x, shared["last_axis"]], f"{p}/mlp/ReduceMean"),
                                      node("Shape", [x], f"{p}/mlp/Shape")], f"{p}/mlp/Expand")
        if i == 0 and zero_input_layer:
            x_up = node("Mul", [x, shared["zero"]], f"{p}/mlp/Mul_zero")
        g = linear(x_gate, f"{p}/mlp/gate_proj", hidden, intermediate)
        g = node("Mul", [g, node("Sigmoid", [g], f"{p}/mlp/act_fn/Sigmoid")], f"{p}/mlp/act_fn/Mul")
        u = node("Mul", [g, linear(x_up, f"{p}/mlp/up_proj", hidden, intermediate)], f"{p}/mlp/Mul")
        h = node("Add", [h, linear(u, f"{p}/mlp/down_proj", intermediate, hidden)], f"{p}/Add_1")
    linear(norm(h, "/model/norm"), "/lm_head", hidden, vocab)  # its output is renamed "logits" below
    nodes[-1].output[0] = "logits"
    w.close()
    graph = helper.make_graph(
        nodes, "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        w.tensors,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def windows(n=4, t=16, vocab=64, seed=0) -> np.ndarray:
    """Random calibration token windows [n, t]."""
    return np.random.default_rng(seed).integers(0, vocab, size=(n, t)).astype(np.int64)


# CLI options for a quick quantize of `small()`: 2 calibration windows of 16 tokens, groups of 32
CALIB = ["--calib-windows", "2", "--calib-seq-len", "16", "--group", "32"]


def small(**kw) -> onnx.ModelProto:
    """`decoder_model` with 2 layers, hidden 32, 4 heads, MLP 64 and a 256-token vocabulary (`write_byte_tokenizer`'s)."""
    return decoder_model(layers=2, hidden=32, heads=4, intermediate=64, vocab=256, **kw)


def save(model: onnx.ModelProto, folder: Path, *, external: bool = False) -> Path:
    """`model` as folder/model.onnx (optionally with all weights in model.onnx.data) next to
    `write_byte_tokenizer`'s tokenizer.json."""
    folder.mkdir(parents=True, exist_ok=True)
    kw = dict(save_as_external_data=True, location="model.onnx.data", size_threshold=0) if external else {}
    onnx.save_model(model, folder / "model.onnx", **kw)
    write_byte_tokenizer(folder)
    return folder / "model.onnx"
