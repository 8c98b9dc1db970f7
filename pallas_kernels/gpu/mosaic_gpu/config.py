"""The Hopper backend's config (`MosaicGPUConfig`), default blocks, and what it supports
(`unsupported`: why a plan cannot run; `supports`: whether `backend="auto"` may pick it)."""
from __future__ import annotations

import dataclasses
import math
import os
import warnings

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from jax_sparse_attn import masks
from jax_sparse_attn.plan import AttentionPlan

from .. import triton_attention


_ROWS = 64  # query rows per compute warpgroup (one wgmma M)
_COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class MosaicGPUConfig:
  """``stages``: K/V shared-memory slots (TMA pipeline depth; None: 2 slots of 128 keys, or
  as many slots of 64 keys as fit, up to 4). ``triton``: the config of the Triton kernels
  where they run the backward (``backward``)."""
  stages: int | None = None
  # The GPU form (FlashAttention-3): P stays in registers as the P·V wgmma's A operand and
  # the product accumulates into the running output. The other form, for interpret mode
  # (which has neither register operands nor `run_state` over accumulators): P goes through
  # shared memory into a fresh accumulator, added afterwards. None: GPU form unless
  # interpreting.
  fused_pv: bool | None = None
  # Neighborhood masks as an MMA bias read from host tables (as the Triton kernels do) where
  # the one-hot is <= 32 columns, in the forward and both backward kernels; False: the
  # per-element interval test.
  mask_mma: bool = True
  # Persistent kernel: one program per SM looping over a static share of the work items
  # (q block, head, batch), so the next item's Q and K/V loads overlap this item's last
  # steps and its output store. Else one program per item, balanced by the hardware
  # scheduler. None: `_persistent_default` of the block map.
  persistent: bool | None = None
  programs: int | None = None  # persistent programs; None: the GPU's SM count
  # Visit q blocks with the most KV blocks first (causal rows, window edges), so the short
  # ones fill the tail.
  longest_first: bool = True
  # Per-warpgroup KV lists (`_split_inputs`): each compute warpgroup visits only the KV
  # blocks its own 64 query rows need, while the memory warpgroup loads their union once.
  # Neighborhood masks with MMA-bias tables; elsewhere the option has no effect. None: with
  # 64-token KV blocks where the block maps say it skips enough work (`_split_pays`).
  split: bool | None = None
  # K/V tiles as TMA boxes: one copy per swizzle group of head_dim (64 columns; 32 at 96)
  # instead of one per row of the tile's last dim (16 copies of a 4x4x8 tile's K, 8 of an
  # 8x16 tile's), with the slots and the output accumulator split by those groups
  # (`_box_groups`). None or True:
  # wherever the tile allows it with the fused P·V form; True also in interpret mode where
  # that form runs (the default interpret form, unfused, and interpret mode's lack of
  # reshaped shared-memory refs keep row copies there). False: row copies.
  box_copies: bool | None = None
  # KV boxes anchored at each query tile's window (`_window_inputs`) instead of a fixed grid
  # of KV tiles: the TMA copies boxes at any offset, so a strided window that starts off the
  # grid (NATTEN centres it on its stride group) is loaded as whole boxes, e.g. every block
  # of 3-D stride k/2 full. Neighborhood masks with MMA-bias tables and one KV list per tile
  # (not with `split`); on the GPU only with box copies. None: where the cost model says
  # they cost less than the grid (`window_pays`). The backward's dQ kernel (its own kernel,
  # not fused) takes the same boxes, None: where they cost less than the backward plan's
  # map (`cost.window_dq_tile`: strided windows on the shifted key grid).
  kv_windows: bool | None = None
  # The backward: "mosaic_gpu" (`attention_bwd.py`: dK/dV per KV block, dQ by its own kernel
  # `attention_bwd_dq.py`; head_dim 129-256: `attention_bwd_wide.py`), "triton" (the Triton
  # kernels, with `triton`'s config), None: by the plan (`policy.picks_mosaic`: 1-D
  # masks, 3-D neighborhoods, long 1-D windows, 2-D ones at head_dim 65-96 here, other
  # neighborhoods on Triton: `hopper_backward_neighborhood`).
  backward: str | None = None
  # How the backward forms dQ: "kernel" (its own kernel over the forward map, no reductions;
  # plans with 128-row Q blocks), or reduce-added in float32 by the dK/dV kernel: "split"
  # (the warpgroups take 64 columns each from both halves of dSᵀ, meeting once per step;
  # head_dim 128 only), "own" (each its own key rows' share, all columns, twice the
  # reduce-adds). None: "split" at head_dim 128 where KV blocks visit many Q blocks
  # (`policy.FUSED_MIN_ENTRIES`: dense, causal, MoBA) and no dead quarters are left
  # to skip, "own" at head_dim 64 on such 1-D masks (`FUSED_MIN_ENTRIES_64`), else "kernel"
  # where the plan allows it, else "split" where it applies.
  backward_dq: str | None = None
  # The backward's warpgroups alternate (FlashAttention-3's ping-pong, as the forward of jax's
  # attention_mgpu example): one's softmax/dS while the other's matmuls run, through a
  # schedule barrier. Needs the "own" dQ form (with "split" they meet every step); an
  # experiment, off by default. Not in interpret mode (there the warpgroups meet per step).
  backward_pingpong: bool = False
  triton: triton_attention.TritonConfig | None = None


def default_map_blocks(head_dim: int, dtype) -> tuple[int, int]:
  # H100, bf16 (docs/experiments/h100-2026-11-23-mgpu-*.json): 128-token KV blocks beat 64
  # for dense (7.80 vs 9.01 ms at S=16384), the sliding window (0.98 vs 1.14 ms) and 2-D NA
  # (8x16 KV tiles: 1.09 vs 1.27 ms), and tie in 3-D. Above head_dim 128, 64 keys: two
  # slots of 128 keys x 256 columns of K and V would not fit shared memory with Q.
  return 2 * _ROWS, 128 if head_dim <= 128 else 64


def hopper_forward_segments(mask) -> bool:
  """Whether `auto` runs the forward of a neighborhood with a padding mask or segment ids on
  these kernels (else Triton's): 2-D windows of at least `NA2D_SEGMENTS_MIN_WINDOW` keys, 3-D
  ones of at least `NA_SEGMENTS_MIN_WINDOW`. With segments the forward tests every element
  of partial blocks and every block's segments (no MMA bias, no window boxes), on tiles
  chosen for that (`cost.auto_tiles`' ``segments``). H100, B=2 (3-D B=1), H=16, D=128,
  padded last dim, forward ms, these / Triton's (docs/experiments/h100-2026-12-06-segment-
  tiles.json; before the segment-aware tiles, -padding-auto-before.json): 2-D 96² k17
  0.37-0.39 / 0.45-0.46 (0.52-0.53 on the tiles chosen for window boxes), 64×128 k25
  0.56-0.57 / 0.68 (0.66-0.67), 3-D 16×64² k4×9² 2.98-3.02 / 2.80-2.82 (4.07-4.08); fwd+bwd
  with Triton's backward 1.34-1.35 / 1.39-1.45 and 2.02-2.04 / 2.12-2.13; 64² k13 (B=8)
  0.59-0.60 / 0.61, fwd+bwd 2.07-2.09 / 2.08-2.09 (-padding-auto-after.json). H200
  (-12-04-na-padding.json): 2-D 128² k33 1.18-1.36 / 1.66-1.72, 3-D 16×64² k8×16² 5.53-5.92
  / 8.34-8.39; k33 at head_dim 64 0.98-1.00 / 1.40-1.41, at 160 (H=8) 0.85-0.86 / 2.67-2.68.
  (1-D: Triton's, not measured.)"""
  if not (isinstance(mask, masks.Neighborhood) and mask.num_dims >= 2):
    return False
  least = NA2D_SEGMENTS_MIN_WINDOW if mask.num_dims == 2 else NA_SEGMENTS_MIN_WINDOW
  return math.prod(mask.kernel_size) >= least


def hopper_backward_neighborhood(mask, head_dim: int, segments: bool = False) -> bool:
  """Whether `MosaicGPUConfig.backward=None` runs a neighborhood's backward on these kernels
  (else Triton's), by the window's keys (prod(kernel_size)) and the head_dim's width:

  * 129-256 (the role-split kernels, `attention_bwd_wide`): every neighborhood. H200, D=256,
    H=8, fwd+bwd ms, these / Triton's backward after the Hopper forward
    (docs/experiments/h200-2026-12-03-wide-na.json): 1-D k1025 2.76 / 5.25, 2-D 96² k33
    2.81 / 4.42, 3-D 16×32² k8×16² 4.43 / 7.32.
  * 1-D windows of at least `NA1D_MIN_KERNEL` keys at every width from 48: H200, B=2,
    H=16, at 128 S=32768 k2049 9.01 / 10.84, k257 1.30 / 1.30, k129 1.27 / 1.04
    (-12-03-na1d-backward.json); H=8, S=16384, at 64 k1025 0.95 / 1.06, k257 0.51 / 0.52, at
    40 k1025 1.01 / 1.26.
  * 2-D/3-D at 48, 80 and 96 columns (Triton's backward pads them to 64 or 128): windows of
    at least `NA_MIN_WINDOW` keys. H200, H=8 (2-D 128², H=16), fwd+bwd ms
    (docs/experiments/h200-2026-12-04-na-backward-pick.json, -na72.json, -na2d_96.json):
    at head_dim 40 2-D 96² k33 0.90 / 1.14, 3-D 16×32² k8×16² 1.39 / 1.73, 3×7² 0.51 / 0.60,
    1-D k1025 1.01 / 1.26, but 2-D 56² k7 (B=64, H=4) 2.78 / 2.55; at 96 2-D 64² k13 0.60 /
    0.64, 3-D 4×9² 0.80 / 0.94, 56² k7 6.90 / 6.27; at 80 64² k13 0.59 / 0.64, 56² k7 6.52 /
    5.92; 72 at 80, 2-D 128² k33 3.74 / 4.95.
  * 2-D/3-D at 64 and 128 (Triton's own widths): 3-D windows of at least `NA3D_MIN_WINDOW`
    keys (at 64 `NA3D_MIN_WINDOW_64`), unstrided 2-D ones (dilation and causal dims allowed)
    from `NA2D_MIN_WINDOW` keys; other 2-D ones on Triton's (its 64-row query tiles). At 128
    3-D 16×64² k8×16² 17.4 / 19.0 (-12-03-grid-order.json; strided on the shifted key grid
    12.00 / 12.25, -backward-forms.json; on the forward's grid since 2026-12-07, an H100:
    10.75-10.79 / 10.59-10.85, h100-2026-12-07-forms-s4096.json), but 3×7² 0.82 / 0.77 and 4×9² 0.95 / 0.87; 2-D 128²
    k33 4.56 / 4.39 (before the quarters; 4.44-4.46 / 4.47-4.49 with them, an H100). At
    64, 3-D k8×16² 1.38 / 1.55, 2-D 96² k33 0.97 / 0.99, 56² k7 5.47 / 3.60.
  * 32: Triton's (2-D 56² k7 1.44 vs 2.22 ms; k33 and 3-D within 3%, -na32.json).
  * With a padding mask or segment ids (``segments``), 2-D/3-D at 64 and 128: Triton's (the
    segment test on every block, no MMA bias). H200, D=128, fwd+bwd ms after the Hopper
    forward, these / Triton's backward (-12-04-na-padding.json): 3-D 16×64² k8×16² 24.4 /
    22.8-23.5, 2-D 128² k33 5.43-5.53 / 4.95-5.14, 96² k17 2.03-2.06 / 1.44-1.49. Above 128
    the role-split kernels keep them (head_dim 160, H=8: k33 3.89-3.93 / 8.22-8.23, 3-D
    16.8-17.1 / 36.4).

  Short windows give short lists of 128-key blocks per CTA, where Triton's 64-row tiles
  visit fewer pairs."""
  width = _padded_head_dim(head_dim)
  if not isinstance(mask, masks.Neighborhood) or width is None:
    return False
  if not triton_attention.available():  # no Triton kernels to leave for
    return True
  if width <= 32:
    return False
  if head_dim > _MAX_BACKWARD_HEAD_DIM:  # the role-split kernels: every neighborhood
    return True
  if segments and mask.num_dims >= 2 and width in (64, 128):
    return False
  keys = math.prod(mask.kernel_size)
  if mask.num_dims == 1:
    return keys >= NA1D_MIN_KERNEL
  if mask.num_dims == 2 and width in (64, 128) and all(st == 1 for st in mask.stride):
    return keys >= NA2D_MIN_WINDOW
  if width in (64, 128):
    return mask.num_dims == 3 and keys >= (NA3D_MIN_WINDOW_64 if width == 64
                                           else NA3D_MIN_WINDOW)
  return keys >= NA_MIN_WINDOW


# Keys in a 1-D window from which the Hopper backward beats Triton's (tied at 257 keys).
NA1D_MIN_KERNEL = 256
# Keys in a 2-D/3-D window from which it does at 48, 80 and 96 columns (loses at 49, wins at
# 147 and 169), and in a 3-D window at 64 and 128 (loses at 324, wins at 2048).
NA_MIN_WINDOW = 128
NA3D_MIN_WINDOW = 1024
# The same at 64 columns, where the backward fuses dQ on long lists
# (`policy.FUSED_MIN_ENTRIES_64`) and the two kernels run short ones. H200, H=8, B=2, fwd+bwd
# ms, these / Triton's backward after the Hopper forward, two runs in one call, the variants'
# order swapped (docs/experiments/h200-2026-12-06-na64-pick.json): 3-D 8×32² k4×9² (324
# keys) 0.582 / 0.638 and 0.601 / 0.652, k3×7² (147) 0.544 / 0.527 and 0.570 / 0.610; 2-D
# stays on Triton's below 1024 keys (64² k13 0.439 / 0.410 and 0.435 / 0.387, 96² k17 0.526 /
# 0.442).
NA3D_MIN_WINDOW_64 = 256
# Keys in an unstrided 2-D window from which it does at 64 and 128 columns, with its dead
# quarters skipped (`policy.QUARTERS_MIN_DEAD`) on tiles chosen by them
# (`cost.QUARTER_TILES`). H100, B=2, H=16, fwd+bwd ms, these / Triton's backward after the
# Hopper forward (docs/experiments/h100-2026-12-06-backward-tiles.json, two rounds): 128²
# k33 4.32-4.27 / 4.51-4.40, dilation 2 4.75-4.71 / 4.74-4.85, causal along h 3.95-3.90 /
# 4.06-4.08, at 64 (96², B=4, H=8) 1.56 / 1.71; but k17 dilation 4 (289 keys) 3.09 / 2.22
# and at 64 56² k7 (B=16, H=8) 1.18 / 0.94; k13 (169) was 1.35x slower. Strided 2-D windows
# stay on Triton's (k32 stride 16: 2.76-2.85 vs 3.18-3.22, -12-05-window-dq-routing.json).
NA2D_MIN_WINDOW = 1024
# Keys in a 3-D window from which the Hopper forward runs a padding mask or segment ids
# faster than Triton's (loses at 324, wins at 2048), and in a 2-D one (wins at 289, 625 and
# 1089, ties at 169): `hopper_forward_segments`.
NA_SEGMENTS_MIN_WINDOW = 1024
NA2D_SEGMENTS_MIN_WINDOW = 256


def default_backward_map_blocks(head_dim: int, dtype, config, mask=None, segments=False):
  """The backward's (query, key) blocks for neighborhoods (1-D masks keep the forward's
  plan): the Mosaic GPU backward's 128 and 128 (its CTA owns 128 keys) where it runs
  (`MosaicGPUConfig.backward="mosaic_gpu"`, or None and `hopper_backward_neighborhood`; with
  ``segments``: a padding mask or segment ids), else the Triton backward's."""
  config = config if isinstance(config, MosaicGPUConfig) else MosaicGPUConfig()
  hopper = config.backward == "mosaic_gpu" or (
      config.backward is None and hopper_backward_neighborhood(mask, head_dim, segments))
  if hopper and _MAX_BACKWARD_HEAD_DIM < head_dim <= 256:
    return 2 * _ROWS, _ROWS  # the role-split kernels' (`attention_bwd_wide`)
  if hopper and head_dim <= _MAX_BACKWARD_HEAD_DIM:
    return 2 * _ROWS, 2 * _ROWS
  return triton_attention.default_backward_map_blocks(head_dim, dtype, config.triton)


def _config(config) -> MosaicGPUConfig:
  if config is None:
    return MosaicGPUConfig()
  if not isinstance(config, MosaicGPUConfig):
    raise ValueError("config for backend='mosaic_gpu' must be a MosaicGPUConfig, got "
                     f"{type(config).__name__}")
  if config.stages is not None and config.stages < 2:
    raise ValueError(f"MosaicGPUConfig.stages must be >= 2, got {config.stages}")
  for name in ("persistent", "split", "box_copies", "kv_windows"):
    if not (getattr(config, name) is None or isinstance(getattr(config, name), bool)):
      raise ValueError(f"MosaicGPUConfig.{name} must be True, False or None, got "
                       f"{getattr(config, name)!r}")
  if config.backward not in (None, "mosaic_gpu", "triton"):
    raise ValueError("MosaicGPUConfig.backward must be 'mosaic_gpu', 'triton' or None, got "
                     f"{config.backward!r}")
  if config.backward_dq not in (None, "split", "own", "kernel"):
    raise ValueError("MosaicGPUConfig.backward_dq must be 'split', 'own', 'kernel' or None, "
                     f"got {config.backward_dq!r}")
  if not isinstance(config.backward_pingpong, bool):
    raise ValueError(f"MosaicGPUConfig.backward_pingpong must be True or False, got "
                     f"{config.backward_pingpong!r}")
  if config.backward_pingpong and config.backward_dq == "split":
    raise ValueError("MosaicGPUConfig.backward_pingpong needs backward_dq='own' (with 'split' "
                     "the warpgroups meet every step)")
  if config.programs is not None and config.programs < 1:
    raise ValueError(f"MosaicGPUConfig.programs must be >= 1, got {config.programs}")
  if config.backward == "triton":
    triton_attention.check_available()
  if config.triton is not None and not isinstance(config.triton, triton_attention.TritonConfig):
    raise ValueError("MosaicGPUConfig.triton must be a TritonConfig or None, got "
                     f"{type(config.triton).__name__}")
  return config


# GPU interpret mode runs each warpgroup as its own XLA:CPU computation whose barrier waits
# block in host callbacks; XLA:CPU's concurrency-optimized scheduler runs such callbacks on
# its intra-op pool (one thread per core), where blocked waits can starve the warpgroup they
# wait for: a deadlock on machines with few cores (docs/performance.md, 2026-12-04).
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_warned_scheduler = []


def box_copies(cfg, interpret) -> bool:
  """Whether K/V tiles may be taken as TMA boxes (`MosaicGPUConfig.box_copies`): None on
  the GPU, True also in interpret mode (whose lack of reshaped shared-memory refs keeps row
  copies there by default), False never. The forward also needs its fused P·V form."""
  return cfg.box_copies is not False and bool(cfg.box_copies or not interpret)


def interpret_params(interpret):
  """The kernels' ``interpret`` argument: `plgpu.InterpretGPUParams()` in interpret mode
  (else False), with a warning, once per process, where XLA_FLAGS leaves XLA:CPU's
  concurrency-optimized scheduler on (`SCHEDULER_FLAG`; it must be set before jax starts)."""
  if not interpret:
    return False
  if not _warned_scheduler and SCHEDULER_FLAG[2:] not in os.environ.get("XLA_FLAGS", ""):
    _warned_scheduler.append(True)
    warnings.warn(
        "GPU interpret mode can deadlock under XLA:CPU's concurrency-optimized scheduler on "
        f"machines with few cores: set XLA_FLAGS={SCHEDULER_FLAG} before importing jax",
        RuntimeWarning, stacklevel=3)
  return plgpu.InterpretGPUParams()


def is_hopper() -> bool:
  """Whether the default GPU is a Hopper (sm_90) GPU."""
  try:
    dev = jax.devices("gpu")[0]
  except RuntimeError:
    return False
  cc = getattr(dev, "compute_capability", None)
  if cc is not None:
    return str(cc).split(".")[0] == "9"
  return any(n in getattr(dev, "device_kind", "") for n in ("H100", "H200", "H800", "H20"))


# The widths (columns) the kernels run a head_dim at: the first that holds it, zero-padded.
# 32, 96 and 160 take 64-byte swizzle groups, 48 and 80 32-byte ones (`swizzle_columns`);
# 160-256 the role-split backward. The lab knob of the width measurements: without a width,
# its head dims run at the next one (docs/performance.md: 32 and 48 at 64, 80 at 96, 96 at
# 128, 160 at 192, 192 at 256). H200, causal S=8192, B=2, H=16, fwd+bwd ms at the own width /
# the next (docs/experiments/h200-2026-12-04-hd48-80-causal.json): 40 2.51 / 2.74, 72 3.28 /
# 3.55, 80 3.11 / 3.66.
WIDTHS = (32, 48, 64, 80, 96, 128, 160, 192, 256)


def _padded_head_dim(d: int) -> int | None:
  """The columns the kernels run a head_dim at: the first of `WIDTHS` that holds it (None
  above 256)."""
  return next((w for w in WIDTHS if d <= w), None)


def swizzle_columns(head_dim: int) -> int:
  """Columns of one swizzle group of the 16-bit shared-memory tiles that meet a head_dim
  operand in one wgmma (both operands of a wgmma from shared memory take one swizzle): 64
  (128-byte swizzle) where head_dim is a multiple of 64, else 32 (64-byte swizzle: 32, 96,
  160), else 16 (32-byte swizzle: 48, 80)."""
  return 64 if head_dim % 64 == 0 else 32 if head_dim % 32 == 0 else 16


def swizzled(head_dim: int) -> tuple:
  """The transforms of those tiles: (8, columns) tiles, swizzled by their row's bytes."""
  cols = swizzle_columns(head_dim)
  return (plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(2 * cols))


def swizzled_f32(columns: int) -> tuple:
  """The transforms of float32 staging tiles (dK/dV, dQ on their way to a TMA reduce-add):
  (8, 32) tiles with a 128-byte swizzle, or (8, 16) with a 64-byte one where the columns are
  no multiple of 32 (head_dim 48 or 80)."""
  cols = 32 if columns % 32 == 0 else 16
  return (plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(4 * cols))


# The 128-row backward kernels take head_dim <= 128; 129-256 run the role-split ones
# (`attention_bwd_wide`, plans with 64-key KV blocks).
_MAX_BACKWARD_HEAD_DIM = 128


def _why_not(dtype, head_dim: int, has_segments: bool, interval: bool, scale: float,
             block_q: int, block_kv: int) -> str | None:
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name} (bfloat16 or float16 only)"
  if _padded_head_dim(head_dim) is None:
    return f"head_dim {head_dim} (at most 256)"
  if head_dim > 128 and block_kv != 64:
    return (f"block_kv {block_kv} with head_dim {head_dim} (64 above head_dim 128: shared "
            f"memory)")
  if scale <= 0:
    return f"scale {scale} (must be positive)"
  if block_q != 2 * _ROWS:
    return f"block_q {block_q} (must be {2 * _ROWS})"
  if block_kv not in (64, 128):
    return f"block_kv {block_kv} (64 or 128)"
  return None


def unsupported(plan: AttentionPlan, head_dim: int, dtype, has_segments: bool,
                scale: float) -> str | None:
  """Why this backend cannot run `plan` (None if it can)."""
  return _why_not(dtype, head_dim, has_segments, plan.mask_fn is None, scale, plan.block_q,
                  plan.block_kv)


def supports(mask, dtype, head_dim: int, has_segments: bool, block_q, block_kv, config,
             scale) -> bool:
  """Whether `backend="auto"` may pick this backend for a call (before its plan exists):
  `unsupported`'s conditions on the call's facts (None: the defaults), no Triton-only
  config, and head_dim <= 256. Up to 32 it runs at 32 columns (padded to 64 it lost to the
  Triton kernels: H100, 8x128x128x4x32 k13, 0.41 vs 0.33 ms forward,
  docs/experiments/h100-2026-11-23-nat-backends.jsonl); at 32 columns, H200, fwd+bwd ms against
  all Triton: causal S=8192 B=2 H=16 2.22 vs 2.55 (cuDNN 2.36), 2-D NA 56² k7 B=64 H=4 1.44
  vs 1.57, 96² k33 0.46 vs 0.53, 3-D k8×16² 0.68 vs 0.79
  (docs/experiments/h200-2026-12-04-hd32.json, -na32.json; neighborhoods keep Triton's
  backward there: `hopper_backward_neighborhood`)."""
  if config is not None and not isinstance(config, MosaicGPUConfig):
    return False
  if head_dim > 256:
    return False
  # head_dim 129-256: 64-key blocks and the role-split backward. H200, D=256, fwd+bwd ms:
  # causal S=8192 B=2 H=16 8.80 (forward 1.79) against 16.1 with the Triton backward and
  # 19.4 all Triton, cuDNN 9.19 (docs/experiments/h200-2026-12-03-wide-backward.json,
  # -head-dim.json); neighborhoods (H=8) 1-D k1025 2.76 vs Triton's 6.14, 2-D 96² k33 2.81 vs
  # 5.07, 3-D 16×32² k8×16² 4.43 vs 8.56 (-wide-na.json). At 192 columns: causal 7.15 vs
  # cuDNN 8.02, neighborhoods 2.27 / 2.35 / 3.63 vs Triton's 6.59 / 5.29 / 8.83
  # (-head-dim-192.json, -na-192.json).
  if (has_segments and isinstance(mask, masks.Neighborhood)
      and not hopper_forward_segments(mask) and triton_attention.available()):
    return False
  if (not triton_attention.available() and head_dim <= _MAX_BACKWARD_HEAD_DIM
      and block_kv not in (None, 2 * _ROWS)):  # a backward only Triton's kernels take
    return False
  return _why_not(dtype, head_dim, has_segments, mask is None or mask.is_interval,
                  1.0 if scale is None else scale, block_q or 2 * _ROWS,
                  block_kv or default_map_blocks(head_dim, dtype)[1]) is None
