"""One-off experiment hook, not part of onnxq (this folder on PYTHONPATH; main process and solve workers alike):
ONNXQ_EXP_DUMP=DIR saves each layer's input statistics (Hessian, TurboBoA's float-stream term, means) as
DIR/<layer>.pt; ONNXQ_EXP_SWAP=DIR with ONNXQ_EXP_ROLES=q_proj,k_proj,... solves the layers of those roles on the
statistics saved in DIR instead of their own (only in blocks FIRST to LAST if ONNXQ_EXP_BLOCKS=FIRST-LAST is set;
the attention-weighted statistics stay the run's own). Run it with GPTQ, whose layer objective is the Hessian alone:
under TurboBoA a swapped Hessian meets the run's own float-stream term (W dXX^T H^-1 mixes two runs) and the model
diverges (PPL 8491 with only q_proj swapped)."""
import os

_dump, _swap = os.environ.get("ONNXQ_EXP_DUMP"), os.environ.get("ONNXQ_EXP_SWAP")
if _dump or _swap:
    import torch

    from onnxq.solve import dispatch as _dispatch

    _problem = _dispatch._problem
    _roles = set((os.environ.get("ONNXQ_EXP_ROLES") or "").split(","))
    _first, _last = map(int, (os.environ.get("ONNXQ_EXP_BLOCKS") or "0-100000").split("-"))

    def _file(layer, folder):
        return os.path.join(folder, layer.node.strip("/").replace("/", "_") + ".pt")

    def _hooked(layer, dev, cov, stats, recipe, spec):
        if _dump:
            torch.save(cov, _file(layer, _dump))
        if _swap and layer.role in _roles and _first <= (layer.block or 0) <= _last:
            cov = torch.load(_file(layer, _swap), weights_only=False)
        return _problem(layer, dev, cov, stats, recipe, spec)

    _dispatch._problem = _hooked
