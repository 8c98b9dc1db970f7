"""Which Hopper backward runs, and in which form: the measured rules.

`picks_mosaic` / `runs_plan` / `own_blocks`: these kernels or Triton's; `wide`: the
role-split kernels above head_dim 128 (`attention_bwd_wide`); `separate_dq`: dQ as its own
kernel (`attention_bwd_dq`) or reduce-added by the dK/dV kernel (the fused form, `split_dq`:
how its warpgroups share dQ); `dead_quarters`: the 64x64 quarters the dK/dV kernel skips;
`slots`: the Q/dO ring's depth. Each knob keeps the measurement that set it (H200 / H100;
docs/performance.md); `attention_bwd` reads them at trace time, so the lab scripts
(`benchmarks/diag/`) set them on this module.
"""
from __future__ import annotations

import numpy as np

from jax_sparse_attn import masks
from jax_sparse_attn.plan import AttentionPlan

from .. import triton_attention
from . import attention_bwd_dq as bwd_dq
from . import attention_bwd_wide as bwd_wide
from .config import _COMPUTE_WGS, _MAX_BACKWARD_HEAD_DIM, _ROWS, _padded_head_dim
from .config import hopper_backward_neighborhood
from .cost import window_dq_tile
from .tables import live_quarters

_BLOCK_KV = _COMPUTE_WGS * _ROWS

STAGES = 2  # Q/dO slots of the memory warpgroup's ring
FUSED_STAGES = 2  # the same with dQ fused (its dSᵀ and dQ staging leave room for two)
# Partial blocks' 64x64 quarters that no query-key pair of the mask may pass
# (`tables.live_quarters`: a sink's KV block seen from far queries, the causal diagonal's
# corner): a dK/dV warpgroup skips such 64-query steps of its keys (static maps, dQ its own
# kernel; a `lax.cond` per partial step). "auto": where at least `QUARTERS_MIN_DEAD` of the
# visited blocks' quarters are dead. H200, the LM layer (`causal & (window 512 | 4 sinks)`,
# S=8192, GQA 16/4, D=128; 16% dead): fwd+bwd 0.922 vs 0.950 ms, gradients bit-identical
# (docs/experiments/h200-2026-12-05-quarters.json; the 2026-12-04 A/B had timed one variant
# twice). H100, 10% dead (docs/experiments/h100-2026-12-05-quarters-na.json; fwd+bwd ms,
# skipped / every step): 2-D NA 128² k33 (B=2, H=16) 4.44-4.46 / 4.64-4.72, 3-D NA 16×64²
# k8×16² (B=1) 17.13-17.14 / 18.02-18.03. Below the share (causal, windows) every step
# runs, as measured before.
QUARTERS = "auto"
QUARTERS_MIN_DEAD = 0.08  # 2-D k33 and 3-D k8×16² 10%, LM 16%; `window 2047 | sink 64` 5.5%
# `MosaicGPUConfig.backward_dq=None` fuses dQ into the dK/dV kernel (at head_dim 128) where KV
# blocks visit at least this many Q blocks on average: the fused form does 5 matmuls per
# block pair instead of the two kernels' 7 but pays more per CTA (dQ reduce-adds, spills).
# H200 fwd+bwd ms, fused / two kernels (docs/experiments/h200-2026-12-03-backward-forms.json;
# mean Q blocks per KV block in brackets): dense S=16384 (128) 29.8 / 31.2, causal (64.5)
# 15.4 / 15.8, 3-D NA k8×16² (32.7) 16.9 / 17.9, MoBA (34) 8.37 / 8.89; the causal window
# 2048 (17) 4.37 / 4.31, the LM layer (~5, GQA 16/4) 1.44 / 1.18. Not where the dK/dV
# kernel skips dead quarters (`QUARTERS`; the fused form does not, and skipping there too
# was 5% slower): H100, 3-D NA k8×16² with dQ its own kernel and the skips 17.13-17.14 ms
# against 17.23-17.34 fused (docs/experiments/h100-2026-12-05-quarters-na.json), a tie in
# a second call (17.09-17.19 vs 17.08-17.12, -12-05-routing-check.json); the two kernels
# then win on what else they give: gradients without float32 reduce-adds (the same bits
# every run) and no float32 dQ buffer (537 MB there).
FUSED_MIN_ENTRIES = 24
# Since dQ is formed a step late (`attention_bwd.DEFERRED_DQ`, 2026-12-07) the fused form also
# wins on shorter lists. H100, fwd+bwd ms, fused / two kernels (one call,
# docs/experiments/h100-2026-12-07-backward-forms.json): the causal window 2048 at S=32768
# (16.5) 3.99 / 4.28, 1-D NA k2049 at S=32768 (17) 8.16 / 8.86 (the LM mask at 5.8 and 2-D NA
# k33 at 15 have dead quarters, so both variants ran the two kernels there: identical
# gradients, 0.90 / 0.88 and 4.23 / 4.13 the call's noise; forced, the deferred fused
# backward of the LM mask took 0.83-0.85 ms against the two kernels' 0.65-0.66 on the H200,
# docs/experiments/h200-2026-12-07-deferred-dq.json). So from this many Q blocks per KV block too,
# except where dQ's window-anchored KV boxes pay (`cost.window_dq_tile`: strided
# neighborhoods: before it, fused lost 2-10% there; after it, on the shifted key grid, 10.98-11.12
# ms fused against 10.98-11.29, a tie, docs/experiments/h100-2026-12-07-forms-s4096.json).
# The lists' lower quartile must reach it too (`short_entries`): causal S=4096 (16.5 on
# average, lists of 1 to 32 blocks, lower quartile 8.75) lost 2 of 3 rounds fused, H100 1.09-1.17 ms
# two kernels / 1.14-1.16 fused (cuDNN 1.20-1.28; docs/experiments/h100-2026-12-07-forms-s4096.json):
# a fixed cost per call (the float32 dQ buffer's fill and cast) over a short triangle; the
# window's and 1-D NA's lists are even (lower quartile 17).
FUSED_MIN_ENTRIES_SHORT = 12
# The deferred fused form (`attention_bwd.DEFERRED_DQ`) skips dead quarters too: a warpgroup
# none of whose keys a partial step's queries may see writes zeros as its half of dSᵀ and
# forms only dQ(t−1) (`attention_bwd`'s `dead_step`); then maps with dead quarters may fuse.
# Before the deferred dQ, a skip there (with the warpgroups meeting inside the `lax.cond`)
# ran 5% slower (docs/performance.md, 2026-12-05). A lab switch, off: H100, fwd+bwd ms,
# the two kernels with their skips / this (docs/experiments/h100-2026-12-07-fused-quarters.json,
# one round): 2-D NA 128² k33 4.24 / 4.42, 3-D NA k8×16² 16.50 / 16.52, the LM mask 0.943 / 0.920.
FUSED_QUARTERS = False
# At head_dim 64 the fused form ("own": each warpgroup reduce-adds its own keys' share; the
# dK/dV accumulators take half the registers, so it does not spill) with 4 Q/dO slots wins
# where KV blocks visit ~15 Q blocks or more and loses on short lists, on every mask. H100,
# fwd+bwd ms, fused with 4 slots / two kernels (mean Q blocks per KV block in brackets;
# interleaved rounds in one call): B=2, H=12, S=16384
# (docs/experiments/h100-2026-12-06-d64-backward.json): dense (128) 12.99 / 13.83-13.85
# (cuDNN 12.67), causal (64.5) 6.71-6.73 / 7.11-7.13 (cuDNN 6.66), causal window 2048 (15.9)
# 1.89-1.90 / 2.00, the LM mask (5.9) 1.00-1.03 / 0.97-0.98; with 2 slots the fused form
# gained half as much, the two kernels nothing from 4. Causal S=4096 (16.5) a tie, 0.574-0.577
# / 0.577-0.579 (cuDNN 0.615; -d64-s4096.json). Neighborhoods, against the two kernels with
# their dead-quarter skips and window-anchored dQ boxes: 3-D NA 16×64² k8×16² (32.7, B=1)
# 7.44-7.46 / 8.01-8.02 (-d64-na3d.json), 2-D NA 128² k33 (15, B=2) 2.016-2.034 /
# 2.066-2.082, strided 3-D k8×16² stride 4×8×8 (16, B=1) 5.00 / 5.24-5.26 (-d64-na-short.json).
# The same on an H200 (h200-2026-12-06-d64-na.json): 2-D 2.01-2.04 / 2.11-2.12, 3-D 7.36-7.41
# / 8.06-8.11.
FUSED_MIN_ENTRIES_64 = 12
FUSED_STAGES_64 = 4
# The two kernels' Q/dO slots at head_dim 96 where no MMA-bias tables are staged beside them.
# H100, B=2, H=12, S=16384, fwd+bwd ms, 4 slots / 2 (interleaved, two rounds;
# docs/experiments/h100-2026-12-06-d96-backward.json): dense 17.90-17.96 / 18.29-18.32 (cuDNN
# 19.24), causal 9.23-9.27 / 9.36-9.40 (cuDNN 10.14); the fused form ("own") gained nothing
# there (18.28-18.36, 9.44-9.56). Neighborhoods keep 2 (H200, B=2 / 1, H=12;
# docs/experiments/h200-2026-12-06-d96-na.json): 2-D NA 128² k33 4 slots 2.69-2.70 / 2
# slots 2.66-2.68, 3-D k8×16² 10.72-10.76 / 10.75-10.79; the fused form over 2 slots 2.81 and
# 10.54 (a loss and a 1.7% win: no rule, not taken), over 4 it does not fit beside the tables
# (244,816 and 235,600 bytes of shared memory against 232,448).
STAGES_96 = 4


def picks_mosaic(plan: AttentionPlan, head_dim: int = 128, segments: bool = False) -> bool:
  """`MosaicGPUConfig.backward=None`: these kernels (dQ as its own kernel) for 1-D masks,
  dense and runtime maps included (H200, bf16 D=128 backward: dense S=16384 25.7 vs 30.0 ms
  for the Triton backward, causal 13.0 vs 15.0, the LM layer 0.87 vs 2.39,
  results/h200-2026-11-29-hopper-backward-dq.json; MoBA fwd+bwd 8.97 vs 9.39,
  docs/experiments/h200-2026-11-29-dq-kernel-routing.json) and for 3-D neighborhoods
  (`config.hopper_backward_neighborhood`: 3-D NA k8×16² fwd+bwd 17.4 vs 19.0 ms, with the grid
  order below, docs/experiments/h200-2026-12-03-grid-order.json; strided ones on the shifted
  key grid 12.00 vs 12.25, -backward-forms.json, and 11.76 through `auto` in
  results/h200-2026-12-03b-headline.json); the Triton kernels for 2-D neighborhoods at head_dim
  97-128 (4.56 vs 4.39 ms at 128² k33: their 64-row query tiles; at 65-96 these, 3.92 vs 4.80,
  docs/experiments/h200-2026-12-04-na2d_{128,96}.json) and packed grids of different sizes.
  What is left for neighborhoods: the permutation into kernel order (0.23-0.69 ms;
  docs/performance.md)."""
  if not triton_attention.available():  # no Triton kernels to leave for
    return True
  if isinstance(plan.mask, masks.PackedNeighborhood):
    return False
  if plan.gathered:  # ``segments``: a padding mask or segment ids
    return hopper_backward_neighborhood(plan.mask, head_dim, segments)
  return True


def own_blocks(plan: AttentionPlan, head_dim: int) -> bool:
  """Whether these kernels take the plan's blocks: 128-key blocks and query blocks of whole
  64-row steps at head_dim <= 128, the role-split kernels' above."""
  return wide(plan, head_dim) or (plan.block_kv == _BLOCK_KV and plan.block_q % _ROWS == 0
                                   and head_dim <= _MAX_BACKWARD_HEAD_DIM)


def runs_plan(plan: AttentionPlan, head_dim: int) -> bool:
  """Whether the backward runs on this plan (`Backend.backward_runs`): these kernels' blocks
  (`own_blocks`), or any with Triton's kernels available to take the others."""
  return own_blocks(plan, head_dim) or triton_attention.available()


def split_dq(cfg, head_dim: int) -> bool:
  """Whether the warpgroups split dQ's columns (meeting once per step) rather than each
  adding its own key rows' share (`MosaicGPUConfig.backward_dq`: "split" | "own"; None:
  "split" with head_dim 128; `backward` refuses "split" below 128)."""
  return head_dim == 128 and cfg.backward_dq != "own" and not cfg.backward_pingpong


# head_dim 129-256 (192 or 256 columns) on the role-split kernels (`attention_bwd_wide`; plans
# with 64-key KV blocks and 128-row Q blocks, the forward's at that head_dim); False: the
# Triton backward.
WIDE_BACKWARD = True


def wide(plan: AttentionPlan, head_dim: int) -> bool:
  """Whether the role-split kernels (`attention_bwd_wide`) take this plan (`WIDE_BACKWARD`)."""
  return (WIDE_BACKWARD and _padded_head_dim(head_dim) in bwd_wide.HEAD_DIMS
          and plan.block_kv == bwd_wide.BLOCK_KV and plan.block_q == 2 * _ROWS)


def separate_dq(cfg, plan: AttentionPlan, head_dim: int = 128, bmap=None) -> bool:
  """Whether dQ is its own kernel over the forward map (`attention_bwd_dq`; 128-row Q blocks)
  rather than reduce-added by the dK/dV kernel (`MosaicGPUConfig.backward_dq`). None: fused where KV
  blocks have long Q lists: "split" at head_dim 128 (`FUSED_MIN_ENTRIES`, or
  `FUSED_MIN_ENTRIES_SHORT` on even lists where dQ's window boxes do not pay) unless the dK/dV kernel has
  dead quarters to skip, "own" at 64 (`FUSED_MIN_ENTRIES_64`); else the kernel."""
  if cfg.backward_pingpong or plan.block_q != bwd_dq._BLOCK_Q:
    return False
  if cfg.backward_dq is not None:
    return cfg.backward_dq == "kernel"
  bmap = bmap or plan.block_map
  entries = mean_entries(bmap)
  if head_dim == 64:
    return entries < FUSED_MIN_ENTRIES_64
  if head_dim != 128 or entries < FUSED_MIN_ENTRIES_SHORT or (
      not FUSED_QUARTERS and dead_quarters(cfg, plan, bmap) is not None):
    return True
  return entries < FUSED_MIN_ENTRIES and (
      short_entries(bmap) < FUSED_MIN_ENTRIES_SHORT or window_dq_tile(plan) is not None)


def dead_quarters(cfg, plan: AttentionPlan, bmap):
  """`tables.live_quarters` of a static map where the dK/dV kernel (with dQ its own kernel)
  skips the dead quarters (`QUARTERS`; "auto": at least `QUARTERS_MIN_DEAD` of them), else
  None."""
  if not QUARTERS or cfg.backward_pingpong or not isinstance(bmap.q_counts, np.ndarray):
    return None
  quarters = live_quarters(plan)
  if quarters is not None and QUARTERS == "auto" and (
      dead_share(bmap, quarters[1]) < QUARTERS_MIN_DEAD):
    return None
  return quarters


def _entries(bmap, stat) -> float:
  """`stat` of Q blocks per KV block over the KV blocks that have any (0 where none has), or a
  runtime map's bound (its counts are traced)."""
  if isinstance(bmap.q_counts, np.ndarray):
    counts = bmap.q_counts[bmap.q_counts > 0]
    return float(stat(counts)) if len(counts) else 0.0
  return bmap.num_q_blocks * bmap.max_kv / bmap.num_kv_blocks


def mean_entries(bmap) -> float:
  """Mean Q blocks per KV block that has any: the static map's, or a runtime map's bound."""
  return _entries(bmap, np.mean)


def short_entries(bmap) -> float:
  """The lower quartile of Q blocks per KV block that has any (a runtime map: its bound)."""
  return _entries(bmap, lambda c: np.percentile(c, 25))


def quarter_counts(bmap, bits: np.ndarray) -> tuple[int, int]:
  """(live, all) 64x64 quarters of a static map's visited blocks (`tables.live_quarters`'
  transposed bits [kv blocks, max q]; full blocks have every bit)."""
  e = np.arange(bits.shape[1])[None]
  visited = e < np.asarray(bmap.q_counts)[:, None]
  live = sum(int(((bits[visited] >> i) & 1).sum()) for i in range(4))
  return live, 4 * int(visited.sum())


def dead_share(bmap, bits: np.ndarray) -> float:
  """The share of dead 64x64 quarters among every visited block's quarters of a static map
  (`quarter_counts`)."""
  live, every = quarter_counts(bmap, bits)
  return 1.0 - live / every if every else 0.0


def slots(separate: bool, head_dim: int, mma) -> int:
  """Q/dO slots of the dK/dV kernel's ring: `FUSED_STAGES_64` / `FUSED_STAGES` with dQ fused,
  else `STAGES_96` at head_dim 96 without MMA-bias tables (4 slots beside them gained
  nothing) and `STAGES` otherwise."""
  if not separate:
    return FUSED_STAGES_64 if head_dim == 64 else FUSED_STAGES
  return STAGES_96 if head_dim == 96 and mma is None else STAGES
