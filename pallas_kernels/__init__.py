"""Pallas kernels: `gpu/` (Triton lowering) and `tpu/` (Mosaic). Each registers a backend
with `jax_sparse_attn.ops.register_backend` on import."""
