"""TPU kernels. `mosaic_attention`: Pallas with the Mosaic lowering (registered as "mosaic")."""
from jax_sparse_attn.backends import Backend, register_backend

from .mosaic_attention import (_SMEM_MAP_BUDGET, backward, default_map_blocks, export_for_tpu,
                               forward, tpu_target)

register_backend("mosaic", Backend(forward, backward, default_map_blocks, min_block=128,
                                   runtime_maps=True, map_block_bytes=_SMEM_MAP_BUDGET))

__all__ = ["forward", "backward", "export_for_tpu", "tpu_target"]
