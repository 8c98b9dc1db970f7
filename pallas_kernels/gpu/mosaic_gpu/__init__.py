"""The Hopper backend ("mosaic_gpu"): block-sparse flash attention in Pallas Mosaic GPU.

`attention_fwd`: the forward kernel; `attention_bwd`: dK/dV per KV block over the transposed
block map (or with dQ reduce-added by the TMA: FlashAttention-3's fused form);
`attention_bwd_dq`: dQ per Q block over the forward map. Beside them: `config` (the config and
what the backend supports), `boxes` (TMA box geometry of the caller's layout), `tables`
(host-built mask inputs: MMA-bias tables, window-anchored boxes, per-warpgroup lists), `cost`
(the tile cost model), `schedule` (shared memory, stages, persistent programs, order),
`work_items` (the dK/dV kernel's work items, static and runtime) and `policy` (which backward
runs, in which form: the measured rules).
"""
from .attention_bwd import backward
from .attention_fwd import forward
from .config import (MosaicGPUConfig, default_backward_map_blocks, default_map_blocks, is_hopper,
                     supports, unsupported)
from .policy import picks_mosaic, runs_plan
from .cost import (auto_tiles, backward_tile_shapes, shares_backward_tiles, split_lists,
                   tile_costs, window_lists, window_pays)

__all__ = ["MosaicGPUConfig", "auto_tiles", "backward", "backward_tile_shapes",
           "shares_backward_tiles", "default_backward_map_blocks",
           "default_map_blocks", "forward", "is_hopper", "picks_mosaic", "runs_plan", "split_lists",
           "supports", "tile_costs", "unsupported", "window_lists", "window_pays"]
