"""Per-head attention statistics for BoA/TurboBoA: Q/K covariances, attention-weighted V Hessians, RoPE tables."""
from __future__ import annotations

import numpy as np
import torch

from ..analysis.attention import AttentionBlock


def _t(x: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device, torch.float32)


class AttentionStats:
    """Accumulates, for one attention block, the statistics the attention-aware solvers need."""

    def __init__(
        self, attn: AttentionBlock, *, device: str = "cpu", block_v: bool = True, residual: bool = False, query_stride: int = 4
    ):
        self.attn = attn
        self.query_stride = query_stride  # V Hessian from every k-th query row: unbiased, k x cheaper
        self.device = device
        self.block_v = block_v and attn.probs is not None
        self.residual = residual and self.block_v
        self.cq = self.ck = self.hv = self.dv = None
        self.cos = self.sin = None
        self.rows = 0  # query positions summed into C_Q / C_K
        self.v_rows = 0

    def capture_names(self) -> list[str]:
        """Tensors this accumulator reads from a block run."""
        a = self.attn
        names = [a.q_tensor, a.k_tensor]
        if a.cos and a.sin:
            names += [a.cos, a.sin]
        if self.block_v:
            names += [a.probs, a.v_input]
        return [n for n in names if n]

    def capture_rows(self) -> dict[str, slice]:
        """Captured tensors of which `add` reads only some rows of axis 2 (query positions), and those rows."""
        return {self.attn.probs: self._query_rows()} if self.block_v else {}

    def _query_rows(self) -> slice:
        return slice(self.query_stride - 1, None, self.query_stride)

    def add(self, cap: dict[str, np.ndarray], cap_fp: dict[str, np.ndarray] | None = None) -> None:
        """Add one batch of captured tensors (and the float stream's, for the V residual term); the attention
        probabilities whole or already cut to `capture_rows`."""
        a = self.attn
        q = _t(cap[a.q_tensor], self.device)  # [B, H, T, d]
        k = _t(cap[a.k_tensor], self.device)  # [B, H, d, T]
        cq = torch.einsum("bhtd,bhte->hde", q, q)
        ck = torch.einsum("bhdt,bhet->hde", k, k)
        self.cq = cq if self.cq is None else self.cq + cq
        self.ck = ck if self.ck is None else self.ck + ck
        self.rows += q.shape[0] * q.shape[2]
        if a.cos and self.cos is None:
            self.cos = _t(cap[a.cos], self.device).reshape(-1, cap[a.cos].shape[-2], cap[a.cos].shape[-1])[0]
            self.sin = _t(cap[a.sin], self.device).reshape(-1, cap[a.sin].shape[-2], cap[a.sin].shape[-1])[0]
        if self.block_v:
            y = torch.einsum("bhts,bsd->bhtd", self._probs(cap, q.shape[2]), _t(cap[a.v_input], self.device))
            hv = torch.einsum("bhtd,bhte->hde", y, y)
            self.hv = hv if self.hv is None else self.hv + hv
            if self.residual and cap_fp is not None:
                yf = torch.einsum("bhts,bsd->bhtd", self._probs(cap_fp, q.shape[2]), _t(cap_fp[a.v_input], self.device))
                dv = torch.einsum("bhtd,bhte->hde", yf - y, y)
                self.dv = dv if self.dv is None else self.dv + dv
            self.v_rows += y.shape[0] * y.shape[2]

    def _probs(self, cap: dict[str, np.ndarray], queries: int) -> torch.Tensor:
        """The sampled query rows of the captured attention probabilities [B, H, T, S] (cut here unless already cut)."""
        probs = cap[self.attn.probs]
        return _t(probs[:, :, self._query_rows()] if probs.shape[2] == queries else probs, self.device)

    def row_hessians(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(H_out of Q per query head, H_out of K per KV head): de-rotated, position-averaged covariances."""
        from ..solvers import derotate_average

        a = self.attn
        n_h, n_kv = a.n_heads, a.n_kv_heads
        cq = self.cq / self.rows
        ck = self.ck / self.rows
        group = n_h // n_kv
        ck_kv = ck if ck.shape[0] == n_kv else ck.reshape(n_kv, group, *ck.shape[1:]).mean(1)  # expanded keys repeat
        if self.cos is not None:
            ck_kv = derotate_average(ck_kv, self.cos, self.sin)
            cq = derotate_average(cq, self.cos, self.sin)
        h_q = ck_kv.repeat_interleave(group, dim=0)
        h_k = cq.reshape(n_kv, group, *cq.shape[1:]).mean(1)
        return h_q, h_k

    def value_hessian(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(per-KV-head H_in of V = 2/N Σ (A_h X)(A_h X)ᵀ averaged over the group, matching dXXᵀ or None)."""
        if self.hv is None:
            return None, None
        a = self.attn
        group = a.n_heads // a.n_kv_heads
        scale = 2.0 / max(self.v_rows, 1)
        hv = (self.hv * scale).reshape(a.n_kv_heads, group, *self.hv.shape[1:]).mean(1)
        dv = None if self.dv is None else (self.dv * scale).reshape(a.n_kv_heads, group, *self.dv.shape[1:]).mean(1)
        return hv, dv
