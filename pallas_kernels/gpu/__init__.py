"""GPU kernels. `triton_attention`: Pallas with the Triton lowering (registered as "triton")."""
from jax_sparse_attn.ops import Backend, register_backend

from .triton_attention import (TritonConfig, backward, default_backward_map_blocks,
                               default_map_blocks, export_for_gpu, forward)

register_backend("triton", Backend(forward, backward, default_map_blocks, gathers=True,
                                   backward_blocks=default_backward_map_blocks))

__all__ = ["TritonConfig", "forward", "backward", "export_for_gpu"]
