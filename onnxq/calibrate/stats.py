"""Running second-moment statistics of captured activations (pure torch)."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import OnnxqError


class Covariance:
    """Accumulates H = (2/N) Σ x xᵀ, the mean of x and, with a float stream, dXXᵀ = (2/N) Σ (x_fp − x_q) x_qᵀ and
    the mean of x_fp, over token rows."""

    def __init__(self, dim: int, *, device: str = "cpu", residual: bool = False):
        self.H = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.dXXt = torch.zeros_like(self.H) if residual else None
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_fp = torch.zeros_like(self.sum) if residual else None
        self.tokens = 0
        self.device = device

    def add(self, x: np.ndarray, x_fp: np.ndarray | None = None) -> None:
        """Add a batch of activations [..., dim] (and the float stream's matching batch)."""
        xq = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, x.shape[-1]))).to(self.device, torch.float32)
        if not torch.isfinite(xq).all():
            raise OnnxqError("calibration activations contain NaN/Inf: check the model in float first (onnxq eval)")
        self.H += xq.T @ xq
        self.sum += xq.sum(0, dtype=torch.float64)
        if self.dXXt is not None and x_fp is not None:
            xf = torch.from_numpy(np.ascontiguousarray(x_fp.reshape(-1, x_fp.shape[-1]))).to(self.device, torch.float32)
            self.dXXt += (xf - xq).T @ xq
            self.sum_fp += xf.sum(0, dtype=torch.float64)
        self.tokens += xq.shape[0]

    def hessian(self) -> torch.Tensor:
        """(2/N) Σ x xᵀ in float32."""
        return self.H * (2.0 / max(self.tokens, 1))

    def residual(self) -> torch.Tensor | None:
        """(2/N) Σ (x_fp − x_q) x_qᵀ in float32, or None without a float stream."""
        return None if self.dXXt is None else self.dXXt * (2.0 / max(self.tokens, 1))

    def mean(self) -> torch.Tensor:
        """Mean input E[x] (float64)."""
        return self.sum / max(self.tokens, 1)

    def mean_fp(self) -> torch.Tensor | None:
        """Mean float-stream input E[x_fp] (float64), or None without a float stream."""
        return None if self.sum_fp is None else self.sum_fp / max(self.tokens, 1)
