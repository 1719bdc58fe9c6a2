"""Where the nonzeros of a batch of sparse activations sit, in the two orders the kernels need.

Entries are stored flat and sorted by row (CSR): ``rows[e]`` and ``cols[e]`` locate entry
``e``; ``crow`` holds each row's first entry. The backward passes also walk the same entries
grouped by feature (CSC); that order is computed once, on first use, and shared by the
encoder and decoder backward of one step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass
class SparseLayout:
    rows: Tensor
    """[nnz] int64, nondecreasing: the batch row of each entry."""
    cols: Tensor
    """[nnz] int64: the feature of each entry."""
    crow: Tensor
    """[B + 1] int64: entries of row ``b`` are ``crow[b]:crow[b + 1]``."""
    n_features: int
    """F, the adapter width."""

    @classmethod
    def from_rows(cls, rows: Tensor, cols: Tensor, n_rows: int, n_features: int) -> SparseLayout:
        counts = torch.bincount(rows, minlength=n_rows)
        return cls(rows, cols, _pointers(counts), n_features)

    @classmethod
    def uniform(cls, cols: Tensor, n_features: int) -> SparseLayout:
        """The layout of ``cols`` [B, k]: exactly k entries per row (TopK)."""
        n_rows, k = cols.shape
        device = cols.device
        rows = torch.arange(n_rows, device=device).repeat_interleave(k)
        crow = torch.arange(0, n_rows * k + 1, k, device=device)
        return cls(rows, cols.reshape(-1), crow, n_features)

    @property
    def n_rows(self) -> int:
        return self.crow.numel() - 1

    @cached_property
    def by_feature(self) -> tuple[Tensor, Tensor, Tensor]:
        """(perm, fptr, rows[perm]): entries of feature f are ``perm[fptr[f]:fptr[f + 1]]``.

        A stable sort keeps the summation order fixed, so the segment sums built on it are
        deterministic without atomics.
        """
        perm = torch.argsort(self.cols, stable=True)
        fptr = _pointers(torch.bincount(self.cols, minlength=self.n_features))
        return perm, fptr, self.rows[perm]


def _pointers(counts: Tensor) -> Tensor:
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr


def csr(crow: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR tensor over trusted indices (the invariant check would cost a pass per call)."""
    with warnings.catch_warnings():
        # torch flags all sparse CSR support as beta; the ops used here are the stable core.
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)
