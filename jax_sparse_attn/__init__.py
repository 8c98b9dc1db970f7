"""jax-sparse-attn: block-sparse and neighborhood flash attention for JAX.

Pipeline: mask spec (`masks`) -> block map (`block_map`) -> backend kernel (`xla_backend`,
`pallas_kernels.gpu`, `pallas_kernels.tpu`) -> custom_vjp op (`ops`) -> sharded op
(`context_parallel`).
"""
from . import block_map, context_parallel, masks, routing
from .block_map import BlockMap
from .merge import merge_attentions
from .backends import register_backend, resolve_backend
from .compat import dot_product_attention
from .ops import NATiling, attention, na, na1d, na2d, na3d, na_packed, na_tiling
from .simulate import simulate

__all__ = ["attention", "dot_product_attention", "na", "na1d", "na2d", "na3d", "na_packed", "na_tiling", "NATiling", "masks", "block_map", "BlockMap",
           "simulate", "register_backend", "resolve_backend", "merge_attentions", "context_parallel", "routing"]
__version__ = "0.1.0"
