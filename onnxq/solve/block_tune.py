"""Block-output tuning: with the codes of a block's solved layers fixed, Adam on each group's scale (and float zero
point) so that the quantized block's output matches the float block's on the same calibration inputs."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from ..solvers import QuantResult
from ..solvers.grid import group_index, make_result
from .torch_graph import TorchGraph


def tune_block(graph: TorchGraph, feeds: list[dict[str, np.ndarray]], results: dict[str, QuantResult], *,
               epochs: int, reference: TorchGraph | None = None, float_outputs: list[list] | None = None,
               alpha: float = 0.0, lr: float = 2e-3, seed: int = 0) -> tuple[dict[str, QuantResult], float, float]:
    """`results` maps weight initializer name -> QuantResult of W [d_out, d_in] (the initializer holds Wᵀ); the
    targets are `reference` (default: `graph` with its own float initializers) on the same feeds, blended with
    weight `alpha` toward `float_outputs` (per feed, the float model's outputs of this block on its own inputs).

    Returns the tuned results with the calibration loss (mean squared output error over `feeds`) before and after;
    the results come back unchanged where tuning did not lower that loss."""
    with torch.no_grad():
        targets = [(reference or graph)(f) for f in feeds]
        if alpha:
            targets = [[(1 - alpha) * t + alpha * torch.as_tensor(u, dtype=t.dtype) for t, u in zip(ts, us)]
                       for ts, us in zip(targets, float_outputs)]
    fixed = {name: (r.codes.float(), group_index(r.codes.shape[1], r.spec), r.scales.float(), r.zeros.float())
             for name, r in results.items()}
    rel = {name: torch.zeros_like(r.scales, dtype=torch.float32, requires_grad=True) for name, r in results.items()}
    shift = {name: torch.zeros_like(r.scales, dtype=torch.float32, requires_grad=r.spec.float_zero)
             for name, r in results.items()}

    def weights() -> dict[str, Tensor]:
        return {name: ((C - (Z + shift[name])[:, g]) * (S * (1 + rel[name]))[:, g]).T
                for name, (C, g, S, Z) in fixed.items()}

    def loss(i: int) -> Tensor:
        outs = graph(feeds[i], weights())
        return sum(((o - t) ** 2).mean() for o, t in zip(outs, targets[i])) / len(outs)

    def total() -> float:
        with torch.no_grad():
            return float(sum(loss(i) for i in range(len(feeds))) / len(feeds))

    before = total()
    tuned = [*rel.values()] + [t for t, r in zip(shift.values(), results.values()) if r.spec.float_zero]
    opt = torch.optim.Adam(tuned, lr=lr)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for i in torch.randperm(len(feeds), generator=order).tolist():
            opt.zero_grad()
            loss(i).backward()
            opt.step()
    after = total()
    if not after < before:
        return results, before, before
    out = {}
    for name, r in results.items():
        _, _, S, Z = fixed[name]
        with torch.no_grad():
            out[name] = replace(make_result(r.codes, S * (1 + rel[name]), Z + shift[name], r.spec), bias=r.bias)
    return out, before, after
