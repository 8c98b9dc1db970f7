"""Pallas kernels: `gpu/` (Triton lowering) and `tpu/` (Mosaic). Each registers a backend
with `jax_sparse_attn.backends.register_backend` on import."""
