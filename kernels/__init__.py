"""Triton kernels for sparse adapter training, each beside its PyTorch twin.

The trainer calls ``sparse_adapter`` (see docs/kernels.md); ``dense_adapter`` is the
dense reference with the same arguments.
"""

from .dense import dense_adapter
from .activations import ACTIVATIONS, TOP_K
from .dispatch import DensityGate, choose_path, sparse_adapter
from .output import SparseOutput

__all__ = ["ACTIVATIONS", "TOP_K", "DensityGate", "SparseOutput", "choose_path", "dense_adapter", "sparse_adapter"]
