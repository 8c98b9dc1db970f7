"""Flax models built from jax_sparse_attn layers."""
