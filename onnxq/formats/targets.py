"""Which ONNX Runtime execution provider runs which quantized weight format: the one support table (peers.md §3.4).

`inspect --target` lints a model against it; `quantize --target` picks its format, bits, block size and
accuracy_level from it and refuses what the target cannot run. Formats: "nbits" (com.microsoft::MatMulNBits),
"qdq" (DequantizeLinear -> MatMul), "gather" (GatherBlockQuantized), "float".
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import OnnxqError

FORMATS = ("nbits", "qdq", "gather", "float")
_ACC_RISK = "accuracy_level=4 quantizes activations to int8: wrong argmax on massive-activation LLMs (onnxruntime#29849); validate, or use 1"
_QDQ_FUSED = ("ORT's QDQ transformer rewrites DequantizeLinear -> MatMul into MatMulNBits with int8 activations "
              "(session.qdq_matmulnbits_accuracy_level defaults to 4; set it to 0 for exact fp32 activations)")


@dataclass(frozen=True)
class TargetSupport:
    """What one target runs. Bits are storage widths (3-bit weights live in 4-bit containers)."""

    name: str
    provider: str  # ONNX Runtime execution provider
    nbits: tuple[int, ...]  # MatMulNBits bit widths with a kernel
    qdq: tuple[int, ...]  # DequantizeLinear -> MatMul widths that run
    gather: tuple[int, ...]  # GatherBlockQuantized widths with a kernel (others fall back to CPU)
    format: str  # what `quantize --target` writes
    accuracy_level: int  # MatMulNBits accuracy_level `quantize --target` writes
    block_size: int  # default block (group) size
    block_sizes: tuple[int, ...] = ()  # MatMulNBits block sizes accepted; () = any power of two >= 16
    activations: tuple[str, ...] = ("float32", "float16")  # MatMulNBits A / scale dtypes
    whole_blocks: bool = False  # MatMulNBits needs K % block_size == 0 (else the node falls back to CPU)
    bias: bool = True  # MatMulNBits accepts the optional g_idx / bias inputs
    blocked_qdq: bool = True  # blocked (not per-channel) DequantizeLinear runs
    float_zero: tuple[int, ...] = ()  # MatMulNBits widths verified with float zero points (onnxq --float-zero)
    qdq_fused: tuple[int, ...] = (4,)  # DequantizeLinear -> MatMul widths ORT rewrites into MatMulNBits
    why: dict[str, str] = field(default_factory=dict)  # condition ("nbits2", "qdq_blocked", ...) -> why it fails
    warn: dict[str, str] = field(default_factory=dict)  # condition ("nbits8", "act:float16", ...) -> why it is flagged
    aliases: tuple[str, ...] = ()


TARGETS: dict[str, TargetSupport] = {t.name: t for t in (
    TargetSupport(
        "cpu", "CPUExecutionProvider", nbits=(2, 4, 8), qdq=(2, 4, 8), gather=(2, 4, 8),
        format="nbits", accuracy_level=4, block_size=128, float_zero=(2, 4),  # 8: "does not support ... floating-point zero points"
        qdq_fused=(2, 4, 8),  # measured on ORT 1.32 (tests/test_targets.py): every width, blocked and per-axis
        why={"act:bfloat16": "the CPU MatMulNBits kernel takes fp32/fp16 activations only"},
        warn={
            "nbits2": "2-bit MatMulNBits on CPU dequantizes to fp32 (ORT PR #25582): smaller, not faster",
            "nbits8": "8-bit MatMulNBits has x86 kernels only (ORT PR #24491); ARM/Android builds fail with "
                      "'Only 4b quantization is supported for unpacked compute' (onnxruntime#24769)",
            "qdq_fused": _QDQ_FUSED,
            "act:float16": "fp16 activations run about 6x slower than fp32 in CPU MatMulNBits (onnxruntime#27251)",
            "accuracy_level:0": "accuracy_level unset: CPU uses the fp32 kernel, about 2.3x slower decode than "
                                "accuracy_level=4 (onnxruntime/mobius PR #402)",
            "accuracy_level:4": _ACC_RISK,
        },
    ),
    TargetSupport(
        "cuda", "CUDAExecutionProvider", nbits=(4, 8), qdq=(4, 8), gather=(4,),
        format="nbits", accuracy_level=0, block_size=128, activations=("float32", "float16", "bfloat16"),
        why={"nbits2": "CUDA MatMulNBits accepts 4 and 8 bits (ORT design doc PR #32657); 2-bit kernels are in flux"},
        warn={"qdq8": "8-bit blocked DequantizeLinear -> MatMul is unverified on CUDA here (no GPU): where ORT does "
                      "not fuse it into MatMulNBits it runs as float DequantizeLinear + MatMul"},
    ),
    TargetSupport(
        "webgpu", "WebGpuExecutionProvider", nbits=(2, 4, 8), qdq=(4,), gather=(4,),
        format="nbits", accuracy_level=4, block_size=32,
        warn={
            "nbits2": "2-bit WebGPU MatMulNBits needs a recent ORT (PR #25763, 2-bit zero points #27285); older builds enforce bits == 4",
            "nbits8": "8-bit WebGPU MatMulNBits needs ORT >= 1.22 (PR #24546/#24590); older builds enforce bits == 4",
            "accuracy_level:4": _ACC_RISK,
        },
    ),
    TargetSupport(
        "web", "JsExecutionProvider", nbits=(4,), qdq=(4,), gather=(),
        format="nbits", accuracy_level=0, block_size=32, aliases=("jsep",),
        why={"nbits": "onnxruntime-web (JSEP) MatMulNBits runs 4 bits only (matmulnbits.ts); browsers report "
                      "'TransposeDQWeightsForMatMulNBits ... Missing required scale'"},
    ),
    TargetSupport(
        "dml", "DmlExecutionProvider", nbits=(4, 8), qdq=(4,), gather=(),
        format="nbits", accuracy_level=0, block_size=32, whole_blocks=True, bias=False, aliases=("directml",),
        why={"qdq8": "8-bit blocked DequantizeLinear reaches DirectML unfused and has crashed session creation "
                     "(third-party report); write MatMulNBits"},
        warn={"nbits": "DirectML's MatMulNBits dequantizes the whole weight to fp16, then runs GEMM (not fused): int4 "
                       "decode can be slower than fp16, and int4 models have failed on DML (onnxruntime#25445)"},
    ),
    TargetSupport(
        "openvino", "OpenVINOExecutionProvider", nbits=(2, 4), qdq=(4, 8), gather=(),
        format="nbits", accuracy_level=0, block_size=128, aliases=("ov",),
        why={"nbits8": "the OpenVINO ONNX frontend translates MatMulNBits with 2 or 4 bits only (openvino PR #26530)"},
    ),
    TargetSupport(
        "qnn", "QNNExecutionProvider", nbits=(2, 4), qdq=(4, 8), gather=(),
        format="nbits", accuracy_level=0, block_size=64, block_sizes=(32, 64), blocked_qdq=False, aliases=("htp",),
        why={
            "nbits": "QNN HTP runs MatMulNBits at 2 and 4 bits with block 32 or 64 (onnxruntime-qnn PR #288)",
            "qdq_blocked": "on QNN HTP it needs 16-bit QDQ activations and QAIRT >= 2.47 (onnxruntime-qnn #476); "
                           "weight-only models with float activations are forced to CPU (#650)",
        },
    ),
    TargetSupport(
        "webnn", "WebNNExecutionProvider", nbits=(4, 8), qdq=(4,), gather=(),
        format="nbits", accuracy_level=0, block_size=32,
        why={"nbits": "WebNN MatMulNBits supports 4 and 8 bits (ORT PR #29025)"},
    ),
    TargetSupport(
        "tensorrt", "TensorrtExecutionProvider", nbits=(), qdq=(4, 8), gather=(),
        format="qdq", accuracy_level=0, block_size=128, aliases=("trt", "trt-rtx"),
        why={"nbits": "TensorRT consumes QDQ (int4 weight-only via DequantizeLinear); MatMulNBits is not a TensorRT "
                      "op and falls back to CUDA/CPU"},
    ),
)}
_ALIASES = {a: t.name for t in TARGETS.values() for a in t.aliases}


def support(target: str) -> TargetSupport:
    """The support entry for `target` (name or alias, case-insensitive); OnnxqError if unknown."""
    key = target.strip().lower()
    found = TARGETS.get(_ALIASES.get(key, key))
    if found is None:
        names = ", ".join(sorted([*TARGETS, *_ALIASES]))
        raise OnnxqError(f"unknown target {target!r}: use one of {names}")
    return found


def choose(target: str, bits: int) -> tuple[str, int]:
    """(format, accuracy_level) that `target` runs `bits`-bit weights with, preferring its default format."""
    t = support(target)
    width = _storage(bits)
    order = (t.format, "qdq" if t.format == "nbits" else "nbits")
    for fmt in order:
        if width in getattr(t, fmt) and (fmt != "qdq" or t.blocked_qdq):
            return fmt, t.accuracy_level if fmt == "nbits" else 0
    runs = sorted(set(t.nbits) | (set(t.qdq) if t.blocked_qdq else set()))
    raise OnnxqError(f"{t.name} ({t.provider}) cannot run {bits}-bit weights: use bits in {runs or 'none (float only)'}")


def check(
    target: str, bits: int, fmt: str, block_size: int = 128, *, k: int | None = None, act_dtype: str = "float32",
    accuracy_level: int | None = None, bias: bool = False,
) -> list[str]:
    """What `target` cannot run (or silently moves to CPU) in one weight of this kind; [] = it runs."""
    return _lint(support(target), bits, fmt, block_size, k, act_dtype, accuracy_level, bias)[0]


def advise(
    target: str, bits: int, fmt: str, block_size: int = 128, *, k: int | None = None, act_dtype: str = "float32",
    accuracy_level: int | None = None, bias: bool = False,
) -> list[str]:
    """What runs on `target` but slowly or with an accuracy risk (same arguments as `check`)."""
    return _lint(support(target), bits, fmt, block_size, k, act_dtype, accuracy_level, bias)[1]


def _lint(t: TargetSupport, bits: int, fmt: str, block_size: int, k: int | None, act: str,
          level: int | None, bias: bool) -> tuple[list[str], list[str]]:
    """(errors, warnings) for one weight; a weight with errors gets no warnings."""
    if fmt not in FORMATS:
        raise OnnxqError(f"unknown weight format {fmt!r}: use one of {', '.join(FORMATS)}")
    width = _storage(bits)
    why = lambda *keys: next((t.why[key] for key in keys if key in t.why), "")  # noqa: E731
    errors: list[str] = []
    if fmt == "nbits":
        if width not in t.nbits:
            errors.append(_because(f"no {width}-bit MatMulNBits kernel (runs {_list(t.nbits)})", why(f"nbits{width}", "nbits")))
        if t.block_sizes and block_size not in t.block_sizes:
            errors.append(_because(f"MatMulNBits block_size {block_size} is not accepted (use {_list(t.block_sizes)})", why("nbits")))
        if t.whole_blocks and k is not None and k % block_size:
            errors.append(f"K={k} is not a multiple of block_size {block_size}: MatMulNBits falls back to CPU")
        if bias and not t.bias:
            errors.append("MatMulNBits with g_idx or bias inputs is not supported")
        if act not in t.activations:
            errors.append(_because(f"MatMulNBits with {act} activations is not supported", why(f"act:{act}")))
    elif fmt == "qdq":
        if width not in t.qdq:
            errors.append(_because(f"{width}-bit DequantizeLinear -> MatMul does not run (runs {_list(t.qdq)})", why(f"qdq{width}")))
        if block_size > 0 and not t.blocked_qdq:
            errors.append(_because("blocked DequantizeLinear -> MatMul falls back to CPU", why("qdq_blocked")))
    if errors:
        return [f"{t.name}: {e}" for e in errors], []
    warnings = []
    if fmt == "gather" and width not in t.gather:
        warnings.append(f"no {width}-bit GatherBlockQuantized kernel: the embedding lookup runs on CPU")
    keys = {"nbits": [f"nbits{width}", "nbits", f"act:{act}", f"accuracy_level:{level}"], "qdq": [f"qdq{width}"]}.get(fmt, [])
    if fmt == "qdq" and width in t.qdq_fused and width in t.nbits:  # ORT rewrites DQ -> MatMul into MatMulNBits
        keys += ["qdq_fused", f"nbits{width}", "nbits", f"act:{act}"]
    warnings += list(dict.fromkeys(t.warn[key] for key in keys if key in t.warn))
    return [], [f"{t.name}: {w}" for w in warnings]


def _storage(bits: int) -> int:
    """Storage width: 3-bit grids are written in 4-bit containers."""
    return 4 if bits == 3 else bits


def _list(values: tuple[int, ...]) -> str:
    return "/".join(map(str, values)) if values else "none"


def _because(problem: str, reason: str) -> str:
    return f"{problem}: {reason}" if reason else problem
