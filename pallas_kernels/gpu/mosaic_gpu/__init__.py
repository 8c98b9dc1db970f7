"""The Hopper backend ("mosaic_gpu"): block-sparse flash attention in Pallas Mosaic GPU.

`attention_fwd`: the forward kernel (TMA boxes of the caller's layout, window-anchored KV boxes,
MMA-bias masks, per-warpgroup KV lists, its tile cost model); `attention_bwd`: dK/dV per KV block
over the transposed block map (or with dQ reduce-added by the TMA: FlashAttention-3's fused
form); `attention_bwd_dq`: dQ per Q block over the forward map.
"""
from .attention_bwd import backward, picks_mosaic
from .attention_fwd import (MosaicGPUConfig, auto_tiles, default_backward_map_blocks,
                      default_map_blocks, forward, is_hopper, split_lists, supports, tile_costs,
                      unsupported, window_lists, window_pays)

__all__ = ["MosaicGPUConfig", "auto_tiles", "backward", "default_backward_map_blocks",
           "default_map_blocks", "forward", "is_hopper", "picks_mosaic", "split_lists",
           "supports", "tile_costs", "unsupported", "window_lists", "window_pays"]
