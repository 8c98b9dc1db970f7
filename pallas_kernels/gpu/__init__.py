"""GPU kernels. `triton_attention`: Pallas with the Triton lowering (registered as "triton");
`mosaic_gpu`: the Hopper kernels in Pallas Mosaic GPU ("mosaic_gpu", forward and backward)."""
from jax_sparse_attn.backends import Backend, register_backend

from .triton_attention import (TritonConfig, backward, default_backward_map_blocks,
                               default_map_blocks, export_for_gpu, forward)
from . import mosaic_gpu
from .mosaic_gpu import MosaicGPUConfig

# The Triton kernels also run 64-row query tiles well (finer tiles, narrower MMA masks);
# Mosaic GPU reads tiles as TMA boxes with rows of a multiple of 8 tokens.
register_backend("triton", Backend(forward, backward, default_map_blocks, gathers=True,
                                   backward_blocks=default_backward_map_blocks,
                                   half_q_tiles=True, runtime_maps=True, segment_maps=True,
                                   sinks=True, softcap=True))

register_backend("mosaic_gpu", Backend(
    mosaic_gpu.forward, mosaic_gpu.backward,
    mosaic_gpu.default_map_blocks, min_block=128, gathers=True,
    backward_blocks=mosaic_gpu.default_backward_map_blocks, tile_last_multiple=8,
    choose_tiles=mosaic_gpu.auto_tiles,
    choose_backward_tiles=mosaic_gpu.backward_tile_shapes,
    shares_backward_tiles=mosaic_gpu.shares_backward_tiles, backward_runs=mosaic_gpu.runs_plan,
    runtime_maps=True, segment_maps=True,
    sinks=True, softcap=True))

__all__ = ["MosaicGPUConfig", "TritonConfig", "forward", "backward", "export_for_gpu"]
