"""Block-wise calibration on ONNX Runtime: run the stem once, then one decoder block at a time."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from onnxq.analysis.layers import Partition
from onnxq.analysis.attention import cache_head_dims
from onnxq.errors import OnnxqError
from onnxq.graph.io import load_tensor_data
from onnxq.calibrate.blocks import SubModel, build_model, split_model, tensor_types
from onnxq.formats.rewrite import add_output_bias

from ..runtime.session import ORT_ERRORS, ort_message, make_session, model_feeds

Env = dict[str, np.ndarray]


class BlockRunner:
    """Streams calibration batches through the stem and then block by block, holding only live tensors."""

    def __init__(
        self, model: onnx.ModelProto, part: Partition, *, ep: str = "cpu", threads: int | None = None,
        folder: str | None = None,
    ):
        self.model = model
        self.ep = ep
        self.threads = threads
        self.folder = folder  # where initializers still on disk (lazily loaded model) are read from, piece by piece
        self.types = tensor_types(model)
        self.stem, self.blocks = split_model(model, part)
        self.head = [model.graph.node[i] for i in part.head]
        self.shared = _input_free(self.stem, {i.name for i in model.graph.input})  # the same in every environment

    def start(self, batches: list[np.ndarray]) -> list[Env]:
        """Run the stem on each token batch [B, T]; returns one environment of live tensors per batch."""
        probe = self._session(self.stem, inputs=[i.name for i in self.model.graph.input])
        envs, dims = [], cache_head_dims(self.model)
        for ids in batches:
            feeds = model_feeds(probe, ids, dims)
            outs = _run(probe, self.stem.outputs, feeds, "the stem (embeddings)")
            env = dict(zip(self.stem.outputs, outs))
            env.update(feeds)
            envs.append(env)
        return envs

    def run(
        self,
        index: int,
        envs: list[Env],
        *,
        capture: list[str] = (),
        weights: dict[str, np.ndarray] | None = None,
        biases: dict[str, np.ndarray] | None = None,
        advance: bool = True,
        group: int = 1,
        rows: dict[str, slice] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Run block `index` on every environment, yielding the captured tensors `group` environments at a time
        (`stack`; `rows` keeps only some rows of axis 2 of the tensors it names).

        With `advance`, each environment is updated in place with the block's outputs (the next block's
        inputs); tensors no later piece reads are dropped. `weights` overrides initializers by name; `biases` (node
        name -> [N]) adds an output bias after those nodes.
        """
        sub = self.blocks[index]
        extra = [c for c in capture if c not in sub.inputs]
        session = self._session(sub, extra=extra, weights=weights, biases=biases)
        names = list(dict.fromkeys(sub.outputs + [c for c in capture if c not in sub.inputs]))
        keep = self._live_after(index) | set(sub.outputs)

        def each() -> Iterator[dict[str, np.ndarray]]:
            for env in envs:
                feeds = {k: env[k] for k in sub.inputs}
                outs = dict(zip(names, _run(session, names, feeds, f"decoder block {index}")))
                outs.update({k: feeds[k] for k in capture if k in feeds})
                captured = {k: outs[k] for k in capture}
                if advance:
                    env.update({k: outs[k] for k in sub.outputs})
                    for k in [k for k in env if k not in keep]:
                        del env[k]
                del feeds, outs  # not alive during the next window's run
                yield captured
                del captured

        yield from stack(each(), len(envs), group, rows)

    def run_head(self, envs: list[Env], capture: list[str], *, group: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Run only the head nodes that `capture` depends on (e.g. the final norm before the LM head) on every
        environment left by the last block; yields the captured tensors `group` environments at a time."""
        produced = {o: n for n in self.head for o in n.output}
        todo, need = [], list(capture)
        while need:
            node = produced.pop(need.pop(), None)
            if node is not None:
                todo.append(node)
                need.extend(t for t in node.input if t)
        nodes = [n for n in self.head if any(n is m for m in todo)]
        if not nodes:  # the captured tensors are the last block's outputs themselves
            yield from stack(({k: env[k] for k in capture} for env in envs), len(envs), group)
            return
        made = {o for n in nodes for o in n.output}
        inits = {t.name for t in self.model.graph.initializer}
        reads = list(dict.fromkeys(t for n in nodes for t in n.input if t and t not in made and t not in inits))
        sub = SubModel(nodes, reads, list(capture), sorted({t for n in nodes for t in n.input if t in inits}))
        session = self._session(sub)
        each = (dict(zip(capture, _run(session, list(capture), {k: env[k] for k in reads}, "the head"))) for env in envs)
        yield from stack(each, len(envs), group)

    def stacked(self, envs: list[Env], names: list[str], group: int) -> list[Env]:
        """`names` of the environments joined along axis 0, `group` environments at a time (weights passed between
        pieces once): the batches one ORT run of the group's windows would have had."""
        shared = [k for k in names if k in self.shared]
        joined = stack(({k: env[k] for k in names if k not in self.shared} for env in envs), len(envs), group)
        return [{**g, **{k: envs[0][k] for k in shared}} for g in joined]

    def piece(self, index: int) -> onnx.ModelProto:
        """Block `index` as a standalone model with its float weights."""
        return self._piece(self.blocks[index])

    def _live_after(self, index: int) -> set[str]:
        """Tensors read by any block after `index` (the head is not run during calibration)."""
        live: set[str] = set()
        for sub in self.blocks[index + 1 :]:
            live.update(sub.inputs)
        return live

    def _session(self, sub: SubModel, *, extra: list[str] = (), inputs: list[str] | None = None,
                 weights: dict[str, np.ndarray] | None = None, biases: dict[str, np.ndarray] | None = None):
        """An ORT session (no memory arena) for `sub` with `weights` overriding initializers (float32) and output
        `biases`; those weights and the large ones still on disk reach ORT as arrays, copied once."""
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in (weights or {}).items()}
        headers = {k: onnx.TensorProto(name=k, data_type=onnx.TensorProto.FLOAT, dims=a.shape)
                   for k, a in arrays.items()}
        piece = self._piece(sub, extra=extra, inputs=inputs, weights=headers, load=False)
        if self.folder is not None:
            for t in piece.graph.initializer:
                if t.name not in arrays and (uses_external_data(t) or self.folder.detached(t)):
                    array = self.folder.array(t)
                    if array is not None:
                        arrays[t.name] = array
            load_tensor_data([t for t in piece.graph.initializer if t.name not in arrays], self.folder)
        if biases:
            piece = with_output_bias(piece, biases)
        return make_session(piece, self.ep, threads=self.threads, arena=False, initializers=arrays)

    def _piece(self, sub: SubModel, *, extra: list[str] = (), inputs: list[str] | None = None, weights=None,
               load: bool = True) -> onnx.ModelProto:
        try:
            piece = build_model(self.model, sub, self.types, extra_outputs=extra, inputs=inputs or None, weights=weights)
        except KeyError as err:  # build_model's signal for a tensor that shape inference left untyped
            raise OnnxqError(f"the type of tensor {err.args[0]!r} is unknown (ONNX shape inference cannot infer it): "
                             "check the model with onnx.shape_inference.infer_shapes or re-export it") from None
        if load and self.folder is not None:  # only this piece's weights are read into memory
            load_tensor_data(piece.graph.initializer, self.folder)
        return piece


def _input_free(stem: SubModel, inputs: set[str]) -> set[str]:
    """Outputs of the stem that no graph input reaches (weights handed on to the blocks): one value for every window."""
    reached = set(inputs)
    for node in stem.nodes:  # in graph order
        if reached.intersection(node.input):
            reached.update(node.output)
    return set(stem.outputs) - reached


def stack(tensors: Iterator[Env], count: int, group: int, rows: dict[str, slice] | None = None) -> Iterator[Env]:
    """The `count` dicts of `tensors` (one per environment) joined along axis 0, `group` at a time (the last group may
    be smaller); of the tensors `rows` names, only those rows of axis 2 (e.g. the attention rows a statistic samples).
    Statistics summed over a group equal those of one ONNX Runtime run of the group's windows, bit for bit, at a
    fraction of the memory: ORT's outputs for a window do not depend on the batch around it."""
    rows = rows or {}
    if group == 1 and not rows:
        yield from tensors
        return
    for start in range(0, count, group):
        size, out = min(group, count - start), {}
        for i in range(size):
            for k, v in next(tensors).items():
                v = v[:, :, rows[k]] if k in rows else v
                if k not in out:
                    out[k] = np.empty((size * v.shape[0], *v.shape[1:]), v.dtype)
                out[k][i * v.shape[0] : (i + 1) * v.shape[0]] = v
        yield out


def with_output_bias(piece: onnx.ModelProto, biases: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`piece` with float32 output `biases` (node name -> [N]) added after the named nodes, in place."""
    return add_output_bias(piece, {k: np.asarray(v, np.float32) for k, v in biases.items()})


def _run(session, names: list[str], feeds: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
    """session.run with ONNX Runtime's failures (bad shapes or values in the model) as one-line OnnxqErrors."""
    try:
        return session.run(names, feeds)
    except ORT_ERRORS as err:
        raise OnnxqError(f"ONNX Runtime failed running {what} ({ort_message(err)}): check that the model runs in "
                         "float (onnxq eval) or re-export it") from None
