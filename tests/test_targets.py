"""The execution-provider support table: lookups, hard problems, warnings and the format choice."""
from __future__ import annotations

import pytest

from onnxq.formats import targets
from onnxq.errors import OnnxqError


def test_support_by_name_and_alias():
    assert targets.support("CPU").provider == "CPUExecutionProvider"
    assert targets.support("directml").name == "dml"
    assert targets.support("jsep").name == "web"
    with pytest.raises(OnnxqError, match="unknown target 'tpu'"):
        targets.support("tpu")


@pytest.mark.parametrize(
    "target, bits, fmt, kwargs, expected",
    [
        ("web", 8, "nbits", {}, "no 8-bit MatMulNBits kernel"),
        ("web", 2, "nbits", {}, "4 bits only"),
        ("cuda", 2, "nbits", {}, "no 2-bit MatMulNBits kernel"),
        ("openvino", 8, "nbits", {}, "no 8-bit MatMulNBits kernel"),
        ("dml", 4, "nbits", {"bias": True}, "g_idx or bias"),
        ("dml", 4, "nbits", {"k": 576}, "K=576 is not a multiple of block_size 128"),
        ("dml", 8, "qdq", {}, "8-bit DequantizeLinear"),
        ("qnn", 4, "nbits", {}, "block_size 128 is not accepted"),
        ("qnn", 4, "qdq", {}, "blocked DequantizeLinear"),
        ("tensorrt", 4, "nbits", {}, "not a TensorRT op"),
        ("cpu", 4, "nbits", {"act_dtype": "bfloat16"}, "bfloat16 activations"),
    ],
)
def test_check_flags_what_the_target_cannot_run(target, bits, fmt, kwargs, expected):
    problems = targets.check(target, bits, fmt, 128, **kwargs)
    assert problems and expected in " ".join(problems)
    assert all(p.startswith(f"{targets.support(target).name}: ") for p in problems)


@pytest.mark.parametrize(
    "target, bits, fmt, block",
    [("cpu", 4, "nbits", 128), ("cpu", 8, "nbits", 32), ("cuda", 8, "nbits", 128), ("qnn", 4, "nbits", 64),
     ("qnn", 8, "qdq", -1), ("tensorrt", 4, "qdq", 128), ("dml", 4, "nbits", 32), ("web", 3, "nbits", 32)],
)
def test_check_is_clean_for_what_runs(target, bits, fmt, block):
    assert targets.check(target, bits, fmt, block, k=1024) == []


def test_advise_slow_and_risky_settings():
    assert "slower decode" in " ".join(targets.advise("cpu", 4, "nbits", accuracy_level=0))
    assert "29849" in " ".join(targets.advise("cpu", 4, "nbits", accuracy_level=4))
    assert "6x slower" in " ".join(targets.advise("cpu", 4, "nbits", accuracy_level=1, act_dtype="float16"))
    assert "qdq_matmulnbits_accuracy_level" in " ".join(targets.advise("cpu", 8, "qdq", 128))
    assert "unverified on CUDA" in " ".join(targets.advise("cuda", 8, "qdq", 128))
    assert "runs on CPU" in " ".join(targets.advise("dml", 4, "gather"))
    assert targets.advise("cpu", 4, "nbits", accuracy_level=1) == []
    assert targets.advise("cuda", 4, "nbits", accuracy_level=0) == []
    assert targets.advise("web", 8, "nbits") == []  # an error is not repeated as a warning


def test_choose_prefers_the_target_format():
    assert targets.choose("cpu", 4) == ("nbits", 4)
    assert targets.choose("cuda", 8) == ("nbits", 0)
    assert targets.choose("tensorrt", 4) == ("qdq", 0)
    assert targets.choose("openvino", 8) == ("qdq", 0)  # MatMulNBits 8-bit is not translated, QDQ is
    assert targets.choose("web", 3) == ("nbits", 0)  # 3-bit lives in 4-bit containers
    with pytest.raises(OnnxqError, match="cannot run 8-bit"):
        targets.choose("web", 8)


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_choice_passes_its_own_check(name):
    """Whatever `choose` picks with the target's default block size is something `check` accepts."""
    t = targets.TARGETS[name]
    for bits in (2, 3, 4, 8):
        try:
            fmt, level = targets.choose(name, bits)
        except OnnxqError:
            continue
        assert targets.check(name, bits, fmt, t.block_size, k=t.block_size * 8, accuracy_level=level) == []


def test_unknown_format_is_refused():
    with pytest.raises(OnnxqError, match="unknown weight format"):
        targets.check("cpu", 4, "awq")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, -1])
def test_cpu_fuses_qdq_matmul_into_matmulnbits(tmp_path, bits, group):
    """The fact behind CPU's qdq_fused: ORT's QDQ transformer turns DQ -> MatMul into MatMulNBits at every width,
    unless QDQSelectorActionTransformer is disabled."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from onnxq.formats.rewrite import to_qdq
    from tests.helpers import random_weight
    from tests.tiny import matmul_model

    rng = np.random.default_rng(bits)
    weights = {f"/layers.{i}/MatMul": random_weight(n, k, bits, group, False, rng) for i, (k, n) in enumerate([(64, 64), (64, 32)])}
    model = to_qdq(matmul_model((64, 64, 32)), weights)

    def fused(disabled):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        return [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node].count("MatMulNBits")

    assert (4 if bits == 3 else bits) in targets.support("cpu").qdq_fused
    assert fused([]) >= 1 and fused(["QDQSelectorActionTransformer"]) == 0

