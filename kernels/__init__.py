"""Triton kernels for sparse adapter training, each beside its PyTorch twin."""
