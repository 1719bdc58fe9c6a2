"""Triton kernels for sparse adapter training, each beside its PyTorch twin.

The trainer calls ``sparse_adapter`` (see docs/kernels.md); ``dense_adapter`` is the
dense reference with the same arguments.
"""

from .dense import dense_adapter
from .dispatch import DensityGate, sparse_adapter
from .output import SparseOutput

__all__ = ["DensityGate", "SparseOutput", "dense_adapter", "sparse_adapter"]
