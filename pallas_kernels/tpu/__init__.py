"""TPU kernels. `mosaic_attention`: Pallas with the Mosaic lowering (registered as "mosaic")."""
from jax_sparse_attn.backends import Backend, register_backend

from .mosaic_attention import (backward, default_map_blocks, export_for_tpu, forward,
                               map_block_fits, tpu_target)

register_backend("mosaic", Backend(forward, backward, default_map_blocks, min_block=128,
                                   runtime_maps=True, segment_maps=True,
                                   runtime_map_fits=map_block_fits, sinks=True, softcap=True))

__all__ = ["forward", "backward", "export_for_tpu", "tpu_target"]
