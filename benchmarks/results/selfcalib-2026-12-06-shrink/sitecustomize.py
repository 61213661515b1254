"""One-off experiment hook, not part of onnxq: with ONNXQ_EXP_SHRINK=beta set and this folder on PYTHONPATH, every
captured input Hessian H becomes (1 - beta) H + beta diag(H) (its off-diagonal correlations shrunk toward zero; the
attention-weighted value and row Hessians are not), in the main process and in the solve workers alike (each imports
sitecustomize at start)."""
import os

_beta = float(os.environ.get("ONNXQ_EXP_SHRINK") or 0)
if _beta:
    import torch

    from onnxq.calibrate import stats as _stats

    _hessian = _stats.Covariance.hessian

    def _shrunk(self):
        H = _hessian(self)
        return (1 - _beta) * H + _beta * torch.diag(torch.diagonal(H))

    _stats.Covariance.hessian = _shrunk
