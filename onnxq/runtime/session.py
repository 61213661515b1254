"""ONNX Runtime sessions: execution providers, session creation and model feeds."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.errors import OnnxqError

# short name → (providers in priority order, the pip package whose build has the first one)
PROVIDERS = {
    "cpu": (["CPUExecutionProvider"], "onnxruntime"),
    "cuda": (["CUDAExecutionProvider", "CPUExecutionProvider"], "onnxruntime-gpu"),
    "tensorrt": (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "onnxruntime-gpu"),
    "dml": (["DmlExecutionProvider", "CPUExecutionProvider"], "onnxruntime-directml"),
    "openvino": (["OpenVINOExecutionProvider", "CPUExecutionProvider"], "onnxruntime-openvino"),
    "coreml": (["CoreMLExecutionProvider", "CPUExecutionProvider"], "onnxruntime (macOS build)"),
}
_NUMPY = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
          "tensor(float16)": np.float16}
_PROTO_LIMIT = 2**31 - 1  # protobuf cannot serialize more; larger models go through a temp file


def _ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types onnxruntime raises for models it cannot load or run (its own, not Python's)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NotImplemented", "RuntimeException",
             "NoSuchFile", "NoModel", "EngineError", "EPFail")
    return tuple(getattr(state, n) for n in names if hasattr(state, n))


ORT_ERRORS = _ort_errors()


def ort_message(err: BaseException) -> str:
    """ORT's message on one line without its "[ONNXRuntimeError] : 1 : FAIL :" prefix, at most 200 characters."""
    text = " ".join(str(err).split())
    return text.split(" : ", 3)[-1][:200] if text.startswith("[ONNXRuntimeError]") else text[:200]


def providers_for(ep: str) -> list[str]:
    """ORT provider list for a short name ("cpu", "cuda", ...); fails if this onnxruntime build lacks it."""
    if ep not in PROVIDERS:
        raise OnnxqError(f"unknown execution provider '{ep}': use one of {', '.join(PROVIDERS)}")
    providers, package = PROVIDERS[ep]
    if providers[0] not in ort.get_available_providers():
        raise OnnxqError(f"execution provider '{ep}' ({providers[0]}) is not in this onnxruntime build "
                         f"(has {', '.join(ort.get_available_providers())}): install {package}")
    if "CUDAExecutionProvider" in providers:
        _preload_cuda_libraries()
    return providers


@functools.cache
def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries that pip installed (e.g. beside torch) before the first CUDA session, as
    onnxruntime-gpu asks; without them the session would fall back to the CPU."""
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def make_session(model: onnx.ModelProto | str | Path, ep: str = "cpu", *, threads: int | None = None,
                 disabled_optimizers: list[str] | None = None, arena: bool = True,
                 initializers: dict[str, np.ndarray] | None = None) -> ort.InferenceSession:
    """An InferenceSession on `ep` for a model file or an in-memory ModelProto (with its weights loaded). Without
    `arena`, CPU memory goes back to the system after each run instead of staying with the session.
    `initializers` give the data of the proto's initializers of those names (marked external here), copied once by
    ORT instead of serialized with the proto."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = arena
    if initializers:
        _external_initializers(model, initializers, options)
    if threads:
        options.intra_op_num_threads = threads
    kwargs = {"providers": providers_for(ep), "disabled_optimizers": disabled_optimizers}
    try:
        if isinstance(model, onnx.ModelProto):
            if model.ByteSize() < _PROTO_LIMIT:
                session = ort.InferenceSession(model.SerializeToString(), options, **kwargs)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    onnx.save_model(model, f"{tmp}/model.onnx", save_as_external_data=True, location="model.onnx.data")
                    session = ort.InferenceSession(f"{tmp}/model.onnx", options, **kwargs)
        elif not Path(model).is_file():
            raise OnnxqError(f"model file '{model}' not found: give an existing .onnx file")
        else:
            session = ort.InferenceSession(str(model), options, **kwargs)
        return _with_cache_dims(session, model)
    except ORT_ERRORS as err:
        what = "the model" if isinstance(model, onnx.ModelProto) else Path(model).name
        raise OnnxqError(f"ONNX Runtime cannot load {what} ({ort_message(err)}): check that it runs in float "
                         "(onnxq eval) or re-export it") from None


def _external_initializers(model: onnx.ModelProto, arrays: dict[str, np.ndarray], options: ort.SessionOptions) -> None:
    """Mark `model`'s initializers named in `arrays` as external data that `options` supplies from the arrays."""
    for t in model.graph.initializer:
        if t.name in arrays:
            t.ClearField("raw_data")
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            t.external_data.add(key="location", value="onnxq-memory")  # ORT takes the data from `options`, not a file
    names = list(arrays)
    options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arrays[n]))
                                              for n in names])


def _with_cache_dims(session: ort.InferenceSession, model: onnx.ModelProto | str | Path) -> ort.InferenceSession:
    """`session` knowing its KV-cache inputs' head size where the graph leaves it symbolic (onnxruntime-genai's builder
    declares 'kv_cache_dim'), so an empty cache can be fed."""
    if any(i.name.startswith("past_key_values") and not isinstance(i.shape[-1], int) for i in session.get_inputs()):
        from onnxq.analysis.attention import cache_head_dims

        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
        session.onnxq_head_dims = cache_head_dims(proto)
    return session


def model_feeds(session: ort.InferenceSession, input_ids: np.ndarray,
                head_dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Feeds for a fresh run: input_ids, all-ones attention_mask, arange position_ids, zero token_type_ids, empty past.
    `head_dims` gives past inputs' last dimension where the graph leaves it symbolic (default: what `make_session`
    found in the session's own graph; a piece without the attention ops needs the whole model's)."""
    batch, seq = input_ids.shape
    feeds = {}
    for arg in session.get_inputs():
        dtype = _NUMPY.get(arg.type)
        if dtype is None:
            raise OnnxqError(f"model input '{arg.name}' has type {arg.type}, which onnxq cannot feed")
        if arg.name == "input_ids":
            feeds[arg.name] = input_ids.astype(dtype)
        elif arg.name == "attention_mask":
            feeds[arg.name] = np.ones((batch, seq), dtype=dtype)
        elif arg.name == "token_type_ids":  # an encoder's (BERT's) segment ids: one segment
            feeds[arg.name] = np.zeros((batch, seq), dtype=dtype)
        elif arg.name == "position_ids":
            feeds[arg.name] = np.broadcast_to(np.arange(seq, dtype=dtype), (batch, seq)).copy()
        elif arg.name.startswith("past_key_values"):
            shape = [batch] + [d if isinstance(d, int) else 0 for d in arg.shape[1:]]
            dims = head_dims if head_dims is not None else getattr(session, "onnxq_head_dims", {})
            if arg.name in dims:
                shape[-1] = dims[arg.name]
            feeds[arg.name] = np.zeros(shape, dtype=dtype)
        else:
            raise OnnxqError(f"model input '{arg.name}' ({arg.type}) is not one onnxq can feed: "
                             "export the model with optimum task text-generation")
    return feeds
