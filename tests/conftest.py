"""Test-wide settings: solvers' small launch-bound loops run fastest on one intra-op thread."""
import torch

torch.set_num_threads(1)
