"""Fused Triton kernels, installed as ``megatron_dual.kernels`` (see DESIGN.md)."""
