"""The architecture matrix: a tiny random Hugging Face model of each family (`tests.tiny.ARCHS`, built from its config)
through export, analysis, every solver at W4 g32 with ORT-vs-reference parity and a quality check, --rotate and the
genai builder's generation-ready folder. Each cell passes or is a refusal asserted here; `python -m tests.support_table`
runs this file and writes docs/support.md from what each test records."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from onnxq.analysis.layers import linear_layers, partition
from onnxq.analysis.attention import attention_blocks, cache_head_dims
from onnxq.deploy.builder import float_build
from onnxq.deploy.generate import generate
from onnxq.errors import OnnxqError
from onnxq.models.export import export_onnx
from onnxq.graph.metadata import read_provenance
from onnxq.graph.normalize import normalize
from onnxq.pipeline import quantize
from onnxq.recipe import QuantRecipe
from onnxq.runtime.evaluate import perplexity
from tests.helpers import cosine, fake_quant_reference, outputs, rel
from tests.tiny import ARCHS, optimum_onnx, tiny_hf, tiny_model

WINDOWS = np.random.default_rng(0).integers(2, 258, (8, 32))  # calibration
EVAL = np.random.default_rng(1).integers(2, 258, (2, 32))
ALGOS = ("rtn", "gptq", "boa", "turboboa")
GATED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
POST_NORM = "post-norm, as in Gemma-2/3"
LAYER_NORM = "feeds LayerNormalization"


@dataclass(frozen=True)
class Expect:
    """What the matrix expects of one family: its block's layer roles, RoPE form, and the refusals it asserts."""

    roles: tuple[str, ...]  # linear layers of one block, in graph order
    rope: str | None = "rotate_half"
    no_rope: str = "none (learned positions)"  # what the table says where `rope` is None
    rotate: str | None = None  # --rotate's refusal (None: it runs)
    folder: str | None = None  # the generation-ready folder's refusal (None: it is written)


EXPECT = {
    "llama": Expect(GATED),
    "mistral": Expect(GATED),
    "qwen2": Expect(GATED),
    "qwen3": Expect(GATED),
    "phi3": Expect(("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), rope=None,
                   no_rope="not recognised (partial-rotary form; only per-head statistics would use it)",
                   folder="no MatMul holding /model/layers.0/mlp/gate_up_proj/MatMul"),  # the builder splits it
    "gemma2": Expect(GATED, rotate=POST_NORM),
    "gemma3_text": Expect(GATED, rotate=POST_NORM, folder="KeyError: 'rope_type'"),  # the builder vs transformers 5
    "gpt2": Expect(("c_attn", "c_proj", "c_fc", "c_proj"), rope=None, rotate=LAYER_NORM,
                   folder="architecture 'GPT2LMHeadModel' is not a text decoder the onnxruntime-genai builder handles"),
    "bert": Expect(("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"), rope=None,
                   rotate=LAYER_NORM, folder="architecture 'BertModel' is not a text decoder the onnxruntime-genai builder handles"),
}


@dataclass
class Built:
    """One family's tiny model: its Hugging Face folder, config and float analysis export."""

    arch: str
    hf: Path
    config: dict
    onnx: Path

    def shape(self) -> tuple[int, int, int, int]:
        """(blocks, heads, KV heads, head dim) from the config."""
        c = self.config
        heads = c.get("num_attention_heads") or c["n_head"]
        hidden = c.get("hidden_size") or c["n_embd"]
        return (c.get("num_hidden_layers") or c["n_layer"], heads, c.get("num_key_value_heads") or heads,
                c.get("head_dim") or hidden // heads)

    def clean(self, message: str) -> str:
        """`message` without this run's temporary folder."""
        return message.replace(str(self.hf), "<hf folder>")


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """arch -> Built, each exported once (lazily) into a module-wide cache."""
    built: dict[str, Built] = {}
    root = tmp_path_factory.mktemp("matrix")

    def get(arch: str) -> Built:
        if arch not in built:
            hf = tiny_hf(arch, root)
            out = optimum_onnx(hf, root / f"{arch}-onnx", "feature-extraction") if arch == "bert" else export_onnx(hf)
            built[arch] = Built(arch, hf, json.loads((hf / "config.json").read_text()), out)
        return built[arch]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONNXQ_CACHE", str(root / "cache"))
        yield get


def _cell(record_property, arch: str, column: str):
    """Record `column` of `arch` as FAIL now; the returned function records the outcome once the checks passed."""
    record_property("support", (arch, column, "FAIL"))
    return lambda text: record_property("support", (arch, column, text))


@pytest.mark.parametrize("arch", ARCHS)
def test_export(matrix, arch, record_property):
    """The optimum export computes the Hugging Face model (ORT against torch); BERT's is feature-extraction, since
    the HF-folder front-end exports causal LMs only."""
    done = _cell(record_property, arch, "optimum export")
    m = matrix(arch)
    with torch.no_grad():
        out = tiny_model(arch)(torch.from_numpy(EVAL))
    expected = (out.last_hidden_state if arch == "bert" else out.logits).numpy()
    assert rel(outputs(m.onnx, EVAL), expected) < 1e-4
    if arch == "bert":
        with pytest.raises(OnnxqError, match="only supports the tasks feature-extraction"):
            export_onnx(m.hf, m.hf.parent / "bert-causal")
        done("✓ feature-extraction (the HF-folder front-end exports causal LMs only)")
    else:
        done("✓ text-generation")


@pytest.mark.parametrize("arch", ARCHS)
def test_analysis(matrix, arch, record_property):
    """Blocks, linear layer roles and the attention map (heads, KV heads, head dim, Q/K/V/O or the packed rows, RoPE,
    causality) match the config."""
    done = _cell(record_property, arch, "analysis")
    m, expect = matrix(arch), EXPECT[arch]
    blocks, heads, kv, d = m.shape()
    model = normalize(onnx.load(str(m.onnx)))
    assert len(partition(model).blocks) == blocks
    layers = {l.node: l for l in linear_layers(model)}
    for b in range(blocks):
        assert tuple(l.role for l in layers.values() if l.block == b) == expect.roles
    attention = attention_blocks(model)
    assert [a.block for a in attention] == list(range(blocks))
    for a in attention:
        assert (a.kind, a.n_heads, a.n_kv_heads, a.head_dim) == ("unfused", heads, kv, d)
        assert (a.causal, a.rope) == (arch != "bert", expect.rope)
        assert layers[a.o].k == heads * d
        if a.fused_qkv:
            q, k = heads * d, (heads + kv) * d
            assert a.qkv_rows == ((0, q), (q, k), (k, k + kv * d)) and layers[a.fused_qkv].n == k + kv * d
        else:
            assert (layers[a.q].n, layers[a.k].n, layers[a.v].n) == (heads * d, kv * d, kv * d)
    qkv = "packed QKV rows" if attention[0].fused_qkv else "Q/K/V"
    done(f"✓ {blocks} blocks, {heads} heads / {kv} KV, head dim {d}, {qkv}, RoPE {expect.rope or expect.no_rope}, "
         f"{'causal' if arch != 'bert' else 'bidirectional'}")


def _float_reference(path: Path) -> onnx.ModelProto:
    """The float export as the pipeline sees it (normalized, a tied head kept shared), weights loaded."""
    return normalize(onnx.load(str(path)), keep_tied=True)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("arch", ARCHS)
def test_solver(matrix, arch, algo, tmp_path, record_property):
    """W4 g32 with `algo`: every block layer quantized; ORT on the file equals the float graph holding the dequantized
    weights (1e-4), and the output stays close to the float model's (cosine; perplexity for decoders)."""
    done, parity = _cell(record_property, arch, algo), _cell(record_property, arch, "ORT parity")
    m = matrix(arch)
    out = tmp_path / "q.onnx"
    rep = quantize(m.onnx, QuantRecipe(algo=algo, bits=4, group_size=32), out, windows=WINDOWS, progress=False)
    assert rep.layers == m.shape()[0] * len(EXPECT[arch].roles)  # the LM head stays float in a .onnx file
    reference = fake_quant_reference(_float_reference(m.onnx), out)
    assert rel(outputs(out, EVAL), outputs(reference, EVAL)) < 1e-4
    parity("✓ ≤ 1e-4 relative")
    assert cosine(outputs(out, EVAL), outputs(m.onnx, EVAL)) > 0.95
    if arch != "bert":
        assert perplexity(out, EVAL) < 1.1 * perplexity(m.onnx, EVAL)
    packed = algo in ("boa", "turboboa") and EXPECT[arch].roles[0] in ("qkv_proj", "c_attn")
    done("✓ packed QKV solved as a plain layer (no per-head statistics)" if packed else "✓")


@pytest.mark.parametrize("arch", ARCHS)
def test_rotate(matrix, arch, tmp_path, record_property):
    """--rotate runs (the rotated model at 8 bits follows the float one; rotations are in the graph) or refuses in one
    line naming the structure it cannot rotate, leaving no file."""
    done = _cell(record_property, arch, "--rotate")
    m, refusal = matrix(arch), EXPECT[arch].rotate
    out = tmp_path / "rot.onnx"
    recipe = QuantRecipe(algo="rtn", bits=8, group_size=32, rotate=True)
    if refusal:
        with pytest.raises(OnnxqError, match=refusal) as err:
            quantize(m.onnx, recipe, out, windows=WINDOWS, progress=False)
        assert not out.exists() and "\n" not in str(err.value)
        done(f"refused: {err.value}")
        return
    quantize(m.onnx, recipe, out, windows=WINDOWS, progress=False)
    model = onnx.load(str(out))
    assert sum("onnxq_rotation" in n.name for n in model.graph.node) >= 2  # R1 in and out, at least
    assert rel(outputs(out, EVAL), outputs(m.onnx, EVAL)) < 0.02
    done(f"✓ {read_provenance(model)['rotation']}")


def _genai_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    """onnxruntime-genai's logits for every position of `ids` [1, T] (prompt processing of a fresh generator)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=128, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids.astype(np.int32))
    return generator.get_output("logits")


@pytest.mark.parametrize("arch", ARCHS)
def test_genai_folder(matrix, arch, tmp_path, record_property):
    """The generation-ready folder (TurboBoA W4 g32): written, loaded and generating, its builder graph analysed and
    equal in float to the analysis export, its logits close to the float builder graph's; or refused in one line."""
    done = _cell(record_property, arch, "genai builder folder")
    m, refusal = matrix(arch), EXPECT[arch].folder
    out = tmp_path / "deploy"
    recipe = QuantRecipe(algo="turboboa", bits=4, group_size=32, accuracy_level=0)
    if refusal:
        with pytest.raises(OnnxqError, match=refusal) as err:
            quantize(str(m.hf), recipe, out, windows=WINDOWS, progress=False)
        assert not out.exists() and "\n" not in str(err.value)
        done(f"refused: {m.clean(str(err.value))}")
        return
    quantize(str(m.hf), recipe, out, windows=WINDOWS, progress=False)
    assert len(generate(out, "hi", max_new_tokens=4).tokens) == 4
    build = float_build(m.hf)
    _check_builder_attention(m, build / "model.onnx")
    ids = EVAL[:1]
    window = m.config.get("sliding_window") if arch == "mistral" else None
    within = ids[:, :window] if window else ids
    assert rel(_genai_logits(build, within), outputs(m.onnx, within)) < 1e-4
    assert cosine(_genai_logits(out, ids), _genai_logits(build, ids)) > 0.95
    if window:  # the builder's graph has no sliding window for Mistral: beyond it, it computes another function
        assert rel(_genai_logits(build, ids), outputs(m.onnx, ids)) > 1e-2
        done(f"✓ up to the sliding window: the builder's graph ignores Mistral's `sliding_window` ({window} here)")
    else:
        done("✓")


def _check_builder_attention(m: Built, path: Path) -> None:
    """The builder's graph: one GroupQueryAttention per block with the config's heads, KV heads and head dim, fed by
    a packed QKV projection whose Q/K/V rows are found; the empty KV caches get that head dim."""
    blocks, heads, kv, d = m.shape()
    model = onnx.load(str(path), load_external_data=False)
    assert cache_head_dims(model) == {f"past_key_values.{b}.{t}": d for b in range(blocks) for t in ("key", "value")}
    attention = attention_blocks(model)
    assert [(a.kind, a.n_heads, a.n_kv_heads, a.head_dim) for a in attention] == \
           [("GroupQueryAttention", heads, kv, d)] * blocks
    q, k = heads * d, (heads + kv) * d
    assert all(a.fused_qkv and a.qkv_rows == ((0, q), (q, k), (k, k + kv * d)) for a in attention)
