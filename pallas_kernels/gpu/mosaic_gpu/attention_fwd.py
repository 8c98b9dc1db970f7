"""Block-sparse flash attention forward for Hopper in Pallas Mosaic GPU ("mosaic_gpu").

FlashAttention-3 structure over a block map. A work item is (Q block of 128 rows, head,
batch); a CTA runs one item, or (persistent) a static share of them, with three
warpgroups. Two compute warpgroups own 64 query rows each and take turns on the tensor
cores (a shared "turn" barrier: one runs QKᵀ while the other runs its softmax); the third is
the memory warpgroup, which loads the item's Q tile, walks the row's visited KV blocks
(``kv_ids``) and TMA-loads K, V and the step's mask data into a ring of shared-memory
slots that runs on across items. Q blocks go longest row first. With per-warpgroup lists
(`MosaicGPUConfig.split`, `_split_inputs`) each compute warpgroup walks the block map of its
own 64 rows, and the memory warpgroup loads the union of the two lists once.

Tiles are TMA boxes in the caller's layout: for neighborhood attention (gathered plans) a Q
block is a spatial tile, e.g. ``q[b, y:y+8, x:x+16, h, :]``, copied straight from
``[batch, *spatial, heads, head_dim]`` (no permuted copies, no index vectors); the edge of
the last spatial dim is the TMA's out-of-bounds handling (zero fill on load, clipped on
store), and tiles must divide the leading spatial dims (`_box_layout`). Plans in
kernel order (1-D sequences, `tiling=`) are the 1-D case of the same. A K/V tile is one copy
per 64 columns of head_dim (box copies, `_box_groups`) where the TMA's 5 strided dims allow,
else one copy per row of its last dim; Q tiles (once per item) copy per row. KV boxes may
also sit on each query tile's window instead of a fixed grid (`MosaicGPUConfig.kv_windows`,
`_window_inputs`): strided windows (NATTEN centres them on their stride group) and odd
kernels start off the grid, and anchored boxes cover them with fewer, fuller blocks.

Full blocks run with no mask arithmetic. Partial blocks of neighborhoods get the MMA bias
of the Triton kernels as one more wgmma into the score accumulator (a one-hot of the
warpgroup's query coordinates times the step's test matrix, read from deduplicated host
tables, TMA-loaded with K); other interval masks test every element against the per-row
intervals ``[lo, hi]`` of each mask dimension (loaded once per warpgroup) and the block's
key coordinates (loaded with K); a mask function runs on the kernel positions of partial
blocks, and segment ids (vectors loaded beside the intervals, `_extras`) are compared on
every block. The log-sum-exp (natural log, ``[batch, heads, n_q]``) is what the backward
(`attention_bwd.py`, or the Triton kernels) reads.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jax_sparse_attn import masks
from jax_sparse_attn.layout import SequenceLayout, TiledLayout
from jax_sparse_attn.plan import AttentionPlan, gathered, make_plan, walked_map

from .. import mma_masks, triton_attention

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
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
  # the one-hot is <= 32 columns; False: the per-element interval test.
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
  # K/V tiles as TMA boxes: one copy per 64 columns of head_dim instead of one per row of
  # the tile's last dim (16 copies of a 4x4x8 tile's K, 8 of an 8x16 tile's), with the
  # slots and the output accumulator split by those 64 columns (`_box_groups`). None or True:
  # wherever the tile allows it with the fused P·V form; True also in interpret mode where
  # that form runs (the default interpret form, unfused, and interpret mode's lack of
  # reshaped shared-memory refs keep row copies there). False: row copies.
  box_copies: bool | None = None
  # KV boxes anchored at each query tile's window (`_window_inputs`) instead of a fixed grid
  # of KV tiles: the TMA copies boxes at any offset, so a strided window that starts off the
  # grid (NATTEN centres it on its stride group) is loaded as whole boxes, e.g. every block
  # of 3-D stride k/2 full. Neighborhood masks with MMA-bias tables and one KV list per tile
  # (not with `split`); on the GPU only with box copies. None: where the cost model says
  # they cost less than the grid (`window_pays`).
  kv_windows: bool | None = None
  # The backward: "mosaic_gpu" (`attention_bwd.py`: dK/dV per KV block, dQ by its own kernel
  # `attention_bwd_dq.py`), "triton" (the Triton kernels, with `triton`'s config), None: by
  # the plan (`attention_bwd.picks_mosaic`: 1-D masks here, neighborhoods on Triton).
  backward: str | None = None
  # How the backward forms dQ: "kernel" (its own kernel over the forward map, no reductions;
  # plans with 128-row Q blocks), or reduce-added in float32 by the dK/dV kernel: "split"
  # (the warpgroups take 64 columns each from both halves of dSᵀ, meeting once per step;
  # head_dim 128 only), "own" (each its own key rows' share, all columns, twice the
  # reduce-adds). None: "kernel" where the plan allows it, else "split" where it applies.
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
  # (8x16 KV tiles: 1.09 vs 1.27 ms), and tie in 3-D.
  return 2 * _ROWS, 128


def default_backward_map_blocks(head_dim: int, dtype, config):
  """The backward's (query, key) blocks for neighborhoods (1-D masks keep the forward's
  plan): the Mosaic GPU backward's 128 and 128 (`MosaicGPUConfig.backward="mosaic_gpu"`: its
  CTA owns 128 keys), else the Triton backward's (`attention_bwd.picks_mosaic`)."""
  if isinstance(config, MosaicGPUConfig) and config.backward == "mosaic_gpu":
    return 2 * _ROWS, 2 * _ROWS
  tconf = config.triton if isinstance(config, MosaicGPUConfig) else None
  return triton_attention.default_backward_map_blocks(head_dim, dtype, tconf)


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
  if config.triton is not None and not isinstance(config.triton, triton_attention.TritonConfig):
    raise ValueError("MosaicGPUConfig.triton must be a TritonConfig or None, got "
                     f"{type(config.triton).__name__}")
  return config


# --------------------------------------------------------------------------------------------
# Geometry: which TMA box a block is.


@dataclasses.dataclass(frozen=True)
class _Boxes:
  """Blocks of a plan side as boxes of a [batch, *spatial, heads, head_dim] view."""
  spatial: tuple[int, ...]   # the view's spatial shape
  tile: tuple[int, ...]      # one block
  grid: tuple[int, ...]      # blocks per dim (row-major block ids)

  def origin(self, block_id):
    """Spatial origin of block `block_id` (a traced int32 scalar)."""
    coords, rest = [], block_id
    for n, t in zip(reversed(self.grid), reversed(self.tile)):
      coords.append(lax.rem(rest, n) * t)
      rest = lax.div(rest, n)
    return coords[::-1]

  def rows(self, origin, tile=None):
    """The box at `origin` as TMA copies of contiguous rows: (first row in the box, the
    row's index into the spatial dims) per leading coordinate (interpret mode has no
    reshaped shared-memory refs, so one copy per row of the last dim)."""
    tile = tile or self.tile
    out = []
    for i, lead in enumerate(np.ndindex(*tile[:-1])):
      index = tuple(o + c for o, c in zip(origin, lead)) + (pl.ds(origin[-1], tile[-1]),)
      out.append((i * tile[-1], index))
    return out


def _boxes(layout) -> _Boxes | None:
  """The box geometry of a layout, or None if its blocks are not boxes (dilation)."""
  if isinstance(layout, SequenceLayout):
    return _Boxes((layout.padded_len,), (layout.block,), (layout.num_blocks,))
  if any(d != 1 for d in layout.dilation):
    return None
  return _Boxes(tuple(layout.spatial_shape), tuple(layout.tile_shape), tuple(layout.tile_grid))


def _half_tile(tile: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
  """A 128-row tile as two 64-row boxes: the tile with its first non-unit dim halved."""
  dim = next(i for i, t in enumerate(tile) if t > 1)
  half = list(tile)
  half[dim] //= 2
  return tuple(half), dim


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


def _padded_head_dim(d: int) -> int | None:
  return 64 if d <= 64 else 128 if d <= 128 else None


def _box_layout(layout) -> bool:
  """Whether a gathered plan's blocks can be read as TMA boxes of the caller's layout (else
  the forward permutes into kernel order: dilation, tiles or a last spatial dim that is not
  a multiple of 8 tokens, or leading spatial dims that the tile does not divide).

  Only the last spatial dim may end in a partial tile. A row copy integer-indexes the
  leading spatial dims, and Mosaic collapses integer-indexed dims (with batch and head)
  into one TMA dim, so a row past the end of a leading dim is not clipped: it lands in the
  next batch or leading index. On the H100 a 9x22x24 grid with 2x8x8 query tiles stored
  such rows over valid output (docs/experiments/h100-2026-11-23-box-checks.json, both copy forms);
  the last dim is a real TMA dim, clipped and zero-filled."""
  boxes = _boxes(layout)
  # Mosaic tiles the last spatial dim of the caller's array by 8 rows for these copies.
  return (boxes is not None and boxes.spatial[-1] % 8 == 0 and boxes.tile[-1] % 8 == 0
          and _half_tile(boxes.tile)[0][-1] % 8 == 0
          and all(s % t == 0 for s, t in zip(boxes.spatial[:-1], boxes.tile[:-1])))


def _why_not(dtype, head_dim: int, has_segments: bool, interval: bool, scale: float,
             block_q: int, block_kv: int) -> str | None:
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name} (bfloat16 or float16 only)"
  if _padded_head_dim(head_dim) is None:
    return f"head_dim {head_dim} (at most 128)"
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


_MIN_AUTO_HEAD_DIM = 32  # `supports`: auto picks this backend only above it


def supports(mask, dtype, head_dim: int, has_segments: bool, block_q, block_kv, config,
             scale) -> bool:
  """Whether `backend="auto"` may pick this backend for a call (before its plan exists):
  `unsupported`'s conditions on the call's facts (None: the defaults), no Triton-only
  config, and head_dim > 32: padded to 64 columns, a head_dim of 32 runs slower than on
  the Triton kernels (H100, the NAT model's shapes, 8x128x128x4x32 k13: 0.41 vs 0.33 ms
  forward, 1.20 vs 1.13 ms with the backward; docs/experiments/h100-2026-11-23-nat-backends.jsonl)."""
  if config is not None and not isinstance(config, MosaicGPUConfig):
    return False
  if head_dim <= _MIN_AUTO_HEAD_DIM:
    return False
  if has_segments and isinstance(mask, masks.Neighborhood):
    # Padding masks / segment ids on a neighborhood: element tests on every block, and a
    # permuted copy; the Triton kernels run them faster (H200, 96x96 k17 B2 H16: 0.46 vs
    # 0.73 ms forward; results/h200-2026-11-29-na-extras.json).
    return False
  return _why_not(dtype, head_dim, has_segments, mask is None or mask.is_interval,
                  1.0 if scale is None else scale, block_q or 2 * _ROWS,
                  block_kv or default_map_blocks(head_dim, dtype)[1]) is None


# --------------------------------------------------------------------------------------------
# The kernel.


def _kernel(order_ref, ids_ref, counts_ref, q_ref, k_ref, v_ref, *refs, qb: _Boxes, kb: _Boxes,
            half: tuple[int, ...], half_dim: int, head_dim: int, heads: int, groups: int,
            dims: int, stages: int, q_bufs: int, programs: int, items: int, scale: float, dtype,
            fused_pv: bool, mma_width: int, split: bool, box: tuple | None,
            window: bool = False, mask_fn=None, segments: bool = False, per_head: bool = False):
  """Program `p` of `programs` runs work items p, p + programs, ... of `items` (q blocks
  fastest, then heads, then batch; the q blocks in the order `order_ref`).

  One KV list per q block (``split=False``): ids [q blocks, steps], counts [q blocks, 2]
  (full, all). Element masks (``mma_width == 0``): refs are q_lo, q_hi [dims, n_q], kv_c
  [dims, n_kv] (kernel positions). MMA-bias masks: onehot [128, W], tables [n, W, block_kv]
  and table_ids [q blocks, steps] (`_mma_inputs`).

  Per-warpgroup lists (``split=True``, `_split_inputs`): ids are the loads [q blocks, loads,
  3] (KV block, each warpgroup's table), counts [q blocks, 6] (steps, loads, each
  warpgroup's active steps, shared steps, paired steps); refs are onehot [128, W] and tables
  [n, W, block_kv]. Then out, lse.

  Window-anchored KV boxes (``window``, `_window_inputs`): ids are the steps' box origins
  [q blocks, steps, dims], the rest as with MMA-bias masks.

  ``box`` (`_box_groups`): K/V come as `_box_view`s and a slot is [head_dim // 64, *box, 8,
  64], one TMA copy per 64 columns; scores sum one wgmma per 64 columns and the output
  accumulates in 64-column parts. Else a slot is [block_kv, head_dim], one copy per row of
  the tile's last dim."""
  mma = mma_width > 0
  # Element masks may run a mask function (`mask_fn`, on the kernel positions of partial
  # blocks) and compare segment ids (``segments``: vectors ``qx`` [batch, 1, n_q] and ``kx``
  # [batch, 1, n_kv], tested on every block).
  extras = int(segments)
  if split:
    onehot_ref, tables_ref, out_ref, lse_ref = refs
  elif mma:
    onehot_ref, tables_ref, table_ids_ref, out_ref, lse_ref = refs
  elif extras:
    lo_ref, hi_ref, c_ref, qx_ref, kx_ref, out_ref, lse_ref = refs
  else:
    lo_ref, hi_ref, c_ref, out_ref, lse_ref = refs
  block_kv = math.prod(kb.tile)
  n_q_blocks = math.prod(qb.grid)
  prog = lax.axis_index("prog")
  mine = lax.div(items - prog + programs - 1, programs)  # my work items
  qk_scale = scale * LOG2E

  def item(k):
    """(q block, head, batch) of my k-th work item."""
    i = prog + k * programs
    qi = order_ref[lax.rem(i, n_q_blocks)]
    hb = lax.div(i, n_q_blocks)
    return qi, lax.rem(hb, heads), lax.div(hb, heads)

  def row(qi, head, batch):
    """The map row of an item: its q block's, or with a runtime map (``per_head``: rows per
    batch, head and q block) its own."""
    return (batch * heads + head) * n_q_blocks + qi if per_head else qi

  def loads(qi, head, batch):
    """KV tiles the memory warpgroup loads for an item."""
    return counts_ref[row(qi, head, batch), 1]

  parts = head_dim // 64 if box is not None else 1  # output accumulator parts
  width = head_dim // parts

  def kv_part(smem, slot, i):
    """Columns [64 i, 64 i + 64) of a K/V slot as [block_kv, 64] (box), or the slot."""
    return smem.at[slot, i].reshape(block_kv, width) if box is not None else smem.at[slot]

  def q_origin(qi, wg):
    origin = list(qb.origin(qi))
    origin[half_dim] = origin[half_dim] + wg * half[half_dim]
    return origin

  def body(q_smem, k_smem, v_smem, row_smem, step_smem, lse_smem, p_smem, q_bar, q_free,
           row_bar, k_bar, v_bar, k_free, v_free, turn):
    """q_smem: [q_bufs, warpgroup] Q tiles (the memory warpgroup loads item k into buffer
    k % q_bufs; the output leaves through it). row_smem: the one-hot [warpgroup, 64, W] or
    per buffer and warpgroup (lo, hi) [.., 2, dims, 64]; step_smem: per slot, the key
    coordinates [dims, block_kv], the test matrix [W, block_kv] or (split) one per
    warpgroup [2, W, block_kv]."""
    wg = lax.axis_index("wg")
    if extras:
      (row_smem, qx_smem), (step_smem, kx_smem) = row_smem, step_smem
    # Window boxes start anywhere along the last dim, which Mosaic's tiled copies do not
    # allow (a tiled dim's start must be a multiple of its 8 rows): the TMA writes the same
    # bytes through a swizzled view without tiling (`kv_raw`), the wgmmas read the tiled one.
    k_raw, v_raw = k_smem, v_smem
    if box is not None and window:
      (k_smem, k_raw), (v_smem, v_raw) = k_smem, v_smem

    def scores(acc_ref, qo, slot):
      """acc_ref += Q K^T of `slot` (one wgmma per 64 columns of a box slot)."""
      for i in range(parts):
        a = qo if parts == 1 else qo.at[:, pl.ds(i * width, width)]
        plgpu.wgmma(acc_ref, a, kv_part(k_smem, slot, i).transpose((1, 0)))

    def rendezvous():
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      if mma:
        plgpu.copy_gmem_to_smem(onehot_ref.at[pl.ds(wg * _ROWS, _ROWS)], row_smem.at[wg],
                                row_bar.at[wg])
        plgpu.barrier_wait(row_bar.at[wg])

      def softmax(s, m_i, l_i, acc, elementwise):
        """Online softmax of scores `s`: (the rescaled acc, new max, new sum, P)."""
        m_new = jnp.maximum(m_i, s.max(axis=1) * qk_scale)
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if elementwise else m_new
        alpha = jnp.exp2(m_i - m_use)
        p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_use, s.shape, [0]))
        acc = tuple(a * lax.broadcast_in_dim(alpha, a.shape, [0]) for a in acc)
        l_i = l_i * alpha + p.sum(axis=1)
        return acc, m_new, l_i, p.astype(dtype)

      def pv(acc, p16, slot, during=None):
        """acc (its parts) + P·V of `slot`; `during()` runs while the wgmmas do."""
        if p_smem is not None:  # interpret mode: wgmma operand A from shared memory only
          p_smem.at[wg][...] = p16
          plgpu.commit_smem()
          p16 = p_smem.at[wg]

        def run(acc_refs):
          for i, acc_ref in enumerate(acc_refs):
            plgpu.wgmma(acc_ref, p16, kv_part(v_smem, slot, i))
          if during is not None:
            during()
          if not fused_pv:
            return acc_refs[0][...]

        if fused_pv:  # accumulate into acc (interpret mode has no run_state)
          return pl.run_state(run)(tuple(plgpu.ACC.init(a) for a in acc))
        return (acc[0] + pl.run_scoped(lambda r: run((r,)),
                                       plgpu.ACC((_ROWS, head_dim), jnp.float32)),)

      def finish(qi, head, batch, qo, buf, acc, m_i, l_i):
        pl.when(wg == 0)(rendezvous)
        # MMA bias: masked scores sit near -2**20 (log2 units), so a row that saw no key has
        # its max below half of that; element masks leave such a row at l == 0.
        seen = m_i > 0.5 * mma_masks.MASKED if mma else l_i > 0.0
        l_safe = jnp.where(seen, l_i, 1.0)
        for i, a in enumerate(acc):
          out = (a / lax.broadcast_in_dim(l_safe, a.shape, [0])).astype(dtype)
          if parts == 1:
            qo[...] = out
          else:
            qo.at[:, pl.ds(i * width, width)][...] = out
        lse = jnp.where(seen, (m_i + jnp.log(l_safe) * LOG2E) * LN2, -jnp.inf)
        lse_smem.at[wg][...] = lse
        plgpu.commit_smem()
        for r, index in qb.rows(q_origin(qi, wg), half):
          plgpu.copy_smem_to_gmem(qo.at[pl.ds(r, half[-1])], out_ref.at[(batch, *index, head)])
          plgpu.copy_smem_to_gmem(lse_smem.at[wg, pl.ds(r, half[-1])],
                                  lse_ref.at[(batch, head, *index)])
        # The buffer (and lse_smem) may be refilled once the stores have read them.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.barrier_arrive(q_free.at[buf])

      def start(k):
        qi, head, batch = item(k)
        buf = lax.rem(k, q_bufs)
        plgpu.barrier_wait(q_bar.at[buf * _COMPUTE_WGS + wg])
        m_i = plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32),
                                plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((_ROWS,), 0.0, jnp.float32),
                                plgpu.Layout.WGMMA.reduce(1))
        acc = tuple(plgpu.layout_cast(jnp.full((_ROWS, width), 0.0, jnp.float32),
                                      plgpu.Layout.WGMMA) for _ in range(parts))
        return qi, head, batch, buf, q_smem.at[buf, wg], (acc, m_i, l_i)

      def work(k, g):
        """My k-th item, whose first KV step is the g-th of this program."""
        qi, head, batch, buf, qo, carry = start(k)
        r = row(qi, head, batch)
        n_all, n_full = counts_ref[r, 1], counts_ref[r, 0]

        @pl.when(n_all > 0)
        def _():
          plgpu.barrier_wait(k_bar.at[lax.rem(g, stages)])

        pl.when(wg == 1)(rendezvous)

        def step(t, carry, masked: bool):
          acc, m_i, l_i = carry
          slot = lax.rem(g + t, stages)

          def qk(acc_ref):
            if masked and mma:  # the bias first: onehot [64, W] @ test [W, block_kv]
              plgpu.wgmma(acc_ref, row_smem.at[wg], step_smem.at[slot])
            scores(acc_ref, qo, slot)
            rendezvous()
            return acc_ref[...]

          s = pl.run_scoped(qk, plgpu.ACC((_ROWS, block_kv), jnp.float32))
          elementwise = (masked or segments) and not mma
          ok = None
          if masked and not mma:
            for d in range(dims):
              c = plgpu.load(step_smem.at[slot, d], layout=plgpu.Layout.WGMMA.reduce(0))
              c = lax.broadcast_in_dim(c, (_ROWS, block_kv), [1])
              lo, hi = (plgpu.load(row_smem.at[buf, wg, i, d],
                                   layout=plgpu.Layout.WGMMA.reduce(1)) for i in range(2))
              term = ((c >= lax.broadcast_in_dim(lo, (_ROWS, block_kv), [0]))
                      & (c <= lax.broadcast_in_dim(hi, (_ROWS, block_kv), [0])))
              ok = term if ok is None else ok & term
          shape = (_ROWS, block_kv)
          if mask_fn is not None and masked:  # on kernel positions, as the Triton kernels
            iota = lambda dim: plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, shape, dim),
                                                 plgpu.Layout.WGMMA)
            term = mask_fn(qi * (2 * _ROWS) + wg * _ROWS + iota(0),
                           ids_ref[row(qi, head, batch), t] * block_kv + iota(1))
            ok = term if ok is None else ok & term
          if segments:
            term = (lax.broadcast_in_dim(plgpu.load(qx_smem.at[buf, wg, 0],
                                                    layout=plgpu.Layout.WGMMA.reduce(1)),
                                         shape, [0])
                    == lax.broadcast_in_dim(plgpu.load(kx_smem.at[slot, 0],
                                                       layout=plgpu.Layout.WGMMA.reduce(0)),
                                            shape, [1]))
            ok = term if ok is None else ok & term
          plgpu.barrier_arrive(k_free.at[slot])
          if elementwise:
            s = jnp.where(ok, s, -jnp.inf)
          acc, m_new, l_i, p16 = softmax(s, m_i, l_i, acc, elementwise)
          acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
          plgpu.barrier_arrive(turn)
          plgpu.barrier_wait(v_bar.at[slot])
          plgpu.barrier_wait(turn)

          def next_k():  # wait for the next K while the P·V wgmma runs
            nxt = t + 1

            @pl.when(nxt < n_all)
            def _():
              plgpu.barrier_wait(k_bar.at[lax.rem(g + nxt, stages)])

          acc = pv(acc, p16, slot, next_k)
          plgpu.barrier_arrive(v_free.at[slot])
          return acc, m_new, l_i

        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(n_full, n_all, functools.partial(step, masked=True), carry)
        finish(qi, head, batch, qo, buf, *carry)
        return g + n_all

      def work_split(k, g):
        """`work` over per-warpgroup lists (`_split_inputs`). Steps [0, shared) hold one
        load both warpgroups compute on; steps [shared, shared + pairs) two loads, one per
        warpgroup; later steps one load, for the warpgroup with the longer list (the other
        idles). Both warpgroups wait for and release every load of every step and keep the
        turn order, so the barriers stay in phase. Load indices follow from the step (no
        per-step reads), and every step adds the MMA bias (a branch on the block's kind
        measured slower on the H100 than the bias on full blocks, whose table 0 is zeros)."""
        qi, head, batch, buf, qo, carry = start(k)
        n_steps, n_active = counts_ref[qi, 0], counts_ref[qi, 2 + wg]
        n_shared, n_pairs = counts_ref[qi, 4], counts_ref[qi, 5]

        def loads_of(t):
          """(the step's first load, whether it has two) as program-wide load indices."""
          paired = (t >= n_shared) & (t < n_shared + n_pairs)
          first = t + jnp.minimum(jnp.maximum(t - n_shared, 0), n_pairs)
          return g + first, paired

        def each_load(t, fn):
          base, paired = loads_of(t)
          fn(lax.rem(base, stages))
          pl.when(paired)(lambda: fn(lax.rem(base + 1, stages)))

        def wait_k(t):
          pl.when(t < n_steps)(lambda: each_load(t, lambda s: plgpu.barrier_wait(k_bar.at[s])))

        wait_k(0)
        pl.when(wg == 1)(rendezvous)

        def step(t, carry, active: bool):
          acc, m_i, l_i = carry
          if active:
            base, paired = loads_of(t)
            slot = lax.rem(base + jnp.where(paired, wg, 0), stages)

            def qk(acc_ref):  # the bias first: onehot [64, W] @ my test matrix [W, block_kv]
              plgpu.wgmma(acc_ref, row_smem.at[wg], step_smem.at[slot, wg])
              scores(acc_ref, qo, slot)
              rendezvous()
              return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((_ROWS, block_kv), jnp.float32))
          else:
            rendezvous()
          each_load(t, lambda s: plgpu.barrier_arrive(k_free.at[s]))
          if active:
            acc, m_i, l_i, p16 = softmax(s, m_i, l_i, acc, False)
            acc, l_i, m_i, p16 = lax.optimization_barrier((acc, l_i, m_i, p16))
          plgpu.barrier_arrive(turn)
          each_load(t, lambda s: plgpu.barrier_wait(v_bar.at[s]))
          plgpu.barrier_wait(turn)
          if active:  # wait for the next step's K while the P·V wgmma runs
            acc = pv(acc, p16, slot, lambda: wait_k(t + 1))
          else:
            wait_k(t + 1)
          each_load(t, lambda s: plgpu.barrier_arrive(v_free.at[s]))
          return acc, m_i, l_i

        carry = lax.fori_loop(0, n_active, functools.partial(step, active=True), carry)
        carry = lax.fori_loop(n_active, n_steps, functools.partial(step, active=False), carry)
        finish(qi, head, batch, qo, buf, *carry)
        return g + loads(qi, head, batch)

      lax.fori_loop(0, mine, work_split if split else work, jnp.int32(0))
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def work(k, g):
        qi, head, batch = item(k)
        buf = lax.rem(k, q_bufs)

        @pl.when(k >= q_bufs)
        def _():
          plgpu.barrier_wait(q_free.at[buf])

        for w in range(_COMPUTE_WGS):
          bar = q_bar.at[buf * _COMPUTE_WGS + w]
          for r, index in qb.rows(q_origin(qi, w), half):
            plgpu.copy_gmem_to_smem(q_ref.at[(batch, *index, head)],
                                    q_smem.at[buf, w, pl.ds(r, half[-1])], bar)
          if not mma:
            row0 = qi * (2 * _ROWS) + w * _ROWS
            for i, ref in enumerate((lo_ref, hi_ref)):
              plgpu.copy_gmem_to_smem(ref.at[:, pl.ds(row0, _ROWS)], row_smem.at[buf, w, i],
                                      bar)
            if extras:
              plgpu.copy_gmem_to_smem(qx_ref.at[batch, :, pl.ds(row0, _ROWS)],
                                      qx_smem.at[buf, w], bar)
        kv_head = lax.div(head, groups)

        @pl.loop(0, loads(qi, head, batch))
        def _(t):
          if window:
            origin = [ids_ref[qi, t, d] for d in range(len(kb.tile))]
          else:
            j = ids_ref[qi, t, 0] if split else ids_ref[row(qi, head, batch), t]
            origin = kb.origin(j)
          slot = lax.rem(g + t, stages)
          reuse = g + t >= stages

          def copy_rows(src, dst, bar):  # the step's KV tile: per 64 columns, or per row
            if box is not None:
              tiled, raw = dst
              if window:  # src: [batch, *spatial, heads, parts, 64]; dst: its raw view
                index = tuple(pl.ds(o, n) if n > 1 else o for o, n in zip(origin, kb.tile))
                dst = raw
              else:
                dst = tiled  # src: [batch, *spatial[:-1], last // 8, 8, heads, parts, 64]
                start = (*origin[:-1], lax.div(origin[-1], 8))
                index = tuple(pl.ds(o, n) if n > 1 else o
                              for o, n in zip(start, (*kb.tile[:-1], kb.tile[-1] // 8)))
                index += (slice(None),)
              for i in range(parts):
                plgpu.copy_gmem_to_smem(src.at[(batch, *index, kv_head, i, slice(None))],
                                        dst.at[slot, i], bar.at[slot])
              return
            for r, index in kb.rows(origin):
              plgpu.copy_gmem_to_smem(src.at[(batch, *index, kv_head)],
                                      dst[0].at[slot, pl.ds(r, kb.tile[-1])], bar.at[slot])

          @pl.when(reuse)
          def _():
            plgpu.barrier_wait(k_free.at[slot])

          copy_rows(k_ref, (k_smem, k_raw), k_bar)
          if split:  # each warpgroup's test matrix (table 0 where it has none)
            for w in range(_COMPUTE_WGS):
              plgpu.copy_gmem_to_smem(tables_ref.at[ids_ref[qi, t, 1 + w]],
                                      step_smem.at[slot, w], k_bar.at[slot])
          elif mma:  # unmasked steps load table 0 too: a fixed arrival count
            plgpu.copy_gmem_to_smem(tables_ref.at[table_ids_ref[qi, t]], step_smem.at[slot],
                                    k_bar.at[slot])
          else:
            plgpu.copy_gmem_to_smem(c_ref.at[:, pl.ds(j * block_kv, block_kv)],
                                    step_smem.at[slot], k_bar.at[slot])
            if extras:
              plgpu.copy_gmem_to_smem(kx_ref.at[batch, :, pl.ds(j * block_kv, block_kv)],
                                      kx_smem.at[slot], k_bar.at[slot])

          @pl.when(reuse)
          def _():
            plgpu.barrier_wait(v_free.at[slot])

          copy_rows(v_ref, (v_smem, v_raw), v_bar)

        return g + loads(qi, head, batch)

      total = lax.fori_loop(0, mine, work, jnp.int32(0))
      # Observe every barrier's last completion before the barriers are freed.
      for s in range(stages):
        @pl.when(s < total)
        def _():
          plgpu.barrier_wait(k_free.at[s])
          plgpu.barrier_wait(v_free.at[s])
      for b in range(q_bufs):
        pl.when(b < mine)(lambda: plgpu.barrier_wait(q_free.at[b]))

  q_rows = math.prod(half[:-1])
  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  if box is not None:  # unit tiling over the box dims: the slot folds to [block_kv, 64]
    kv_copies, kv_slot = parts, (parts, *box, 8, width)
    kv_transforms = (plgpu.TilingTransform((1,) * len(box) + (8, 64)),
                     plgpu.SwizzleTransform(128))
  else:
    kv_copies, kv_slot, kv_transforms = math.prod(kb.tile[:-1]), (block_kv, head_dim), swizzled
  kv_smem = plgpu.SMEM((stages, *kv_slot), dtype, transforms=kv_transforms)
  if box is not None and window:  # the same bytes untiled: [parts, *tile less unit dims, 64]
    raw = plgpu.SMEM((stages, parts, *(n for n in kb.tile if n > 1), width), dtype,
                     transforms=(plgpu.SwizzleTransform(128),))
    kv_smem = plgpu.RefUnion(kv_smem, raw)
  if mma:  # wgmma operands with K = W: (8, W) tiles, swizzle 2W bytes (bf16)
    narrow = (plgpu.TilingTransform((8, mma_width)), plgpu.SwizzleTransform(2 * mma_width))
    row_smem = plgpu.SMEM((_COMPUTE_WGS, _ROWS, mma_width), jnp.bfloat16, transforms=narrow)
    per_slot = (_COMPUTE_WGS, mma_width, block_kv) if split else (mma_width, block_kv)
    step_smem = plgpu.SMEM((stages, *per_slot), jnp.bfloat16, transforms=narrow)
  else:
    row_smem = plgpu.SMEM((q_bufs, _COMPUTE_WGS, 2, dims, _ROWS), jnp.int32)
    step_smem = plgpu.SMEM((stages, dims, block_kv), jnp.int32)
    if extras:
      row_smem = (row_smem, plgpu.SMEM((q_bufs, _COMPUTE_WGS, extras, _ROWS), jnp.int32))
      step_smem = (step_smem, plgpu.SMEM((stages, extras, block_kv), jnp.int32))
  step_copies = (_COMPUTE_WGS if split else 1) + extras
  pl.run_scoped(
      body,
      plgpu.SMEM((q_bufs, _COMPUTE_WGS, _ROWS, head_dim), dtype, transforms=swizzled),
      kv_smem,
      kv_smem,
      row_smem,
      step_smem,
      plgpu.SMEM((_COMPUTE_WGS, _ROWS), jnp.float32),
      None if fused_pv else plgpu.SMEM((_COMPUTE_WGS, _ROWS, block_kv), dtype, transforms=swizzled),
      plgpu.Barrier(num_arrivals=q_rows + (0 if mma else 2) + extras,
                    num_barriers=q_bufs * _COMPUTE_WGS),
      plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=q_bufs),
      plgpu.Barrier(num_arrivals=1, num_barriers=_COMPUTE_WGS),
      plgpu.Barrier(num_arrivals=kv_copies + step_copies, num_barriers=stages),
      plgpu.Barrier(num_arrivals=kv_copies, num_barriers=stages),
      plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
      collective_axes="wg",
  )


def _onehot(spec: mma_masks.MaskSpec, rows: int) -> np.ndarray:
  """The MMA bias's A operand [rows, W]: each row's coordinate columns."""
  r, u = np.arange(rows)[:, None], np.arange(spec.mma_width)[None, :]
  hit = np.zeros((rows, spec.mma_width), bool)
  for offset, extent, stride in spec.mma_cols:
    if offset >= 0:
      hit |= (u - offset) == (r // stride) % extent
  return hit


def _mma_spec(plan: AttentionPlan, rows: int, scale: float):
  """The MMA-bias spec with host tables for `rows`-row query tiles, or None."""
  cfg = triton_attention.TritonConfig(mma_onehot="rows", single_loop=False)
  spec = mma_masks.mask_spec(plan, False, cfg, rows, plan.block_kv, scale, forward=True)
  return spec if spec.mma_cols is not None and spec.mma_tables else None


def _mma_inputs(plan: AttentionPlan, scale: float):
  """MMA-bias masks for neighborhood plans (`triton_attention._MMABias`, one-hot on the
  query side): (onehot [128, W] bf16, tables [n, W, block_kv] bf16 of 0 / the masked value,
  table_ids [q blocks, steps] int32), or None where they do not apply (1-D sequences,
  W > 32, tables over budget). Both compute warpgroups share a step's table: its columns
  are the coordinates of the whole 128-row tile."""
  rows = 2 * _ROWS
  spec = _mma_spec(plan, rows, scale)
  built = None if spec is None else mma_masks.tables(plan, spec, rows, plan.block_kv, True)
  if built is None:
    return None
  tables, table_ids = built
  tables = np.where(tables, 0.0, spec.mma_value)
  return (_onehot(spec, rows).astype(jnp.bfloat16), tables.astype(jnp.bfloat16),
          table_ids.astype(np.int32))


@functools.lru_cache(maxsize=64)
def _window_inputs(plan: AttentionPlan, scale: float):
  """Window-anchored KV boxes (`MosaicGPUConfig.kv_windows`) for a gathered neighborhood
  plan: each query tile visits boxes of the KV tile's shape placed on its own union window
  (`simulate.window_segments`, per dim; a box is the product of one segment per dim), full
  boxes first. Masks are the MMA bias of `_mma_inputs`, its tables built here from spatial
  coordinates: a key passes a column's dim where it is inside that query coordinate's
  interval and owned by the box (a box moved back from the array's edge masks the keys of
  the box before it).

  Returns (origins [q blocks, steps, dims] int32: each step's box origin; counts [q blocks,
  2] (full, all); onehot [128, W]; tables [n, W, block_kv]; table_ids [q blocks, steps]), or
  None where this does not apply (no neighborhood, dilation, 1-D, block maps known only at
  run time, one-hot wider than 32 columns, a box larger than the array)."""
  from jax_sparse_attn.simulate import window_segments
  mask = plan.mask
  if (not isinstance(mask, masks.Neighborhood) or not isinstance(plan.q_layout, TiledLayout)
      or not isinstance(plan.kv_layout, TiledLayout)
      or not isinstance(plan.block_map.kv_ids, np.ndarray)):
    return None
  spec = _mma_spec(plan, 2 * _ROWS, scale)
  if spec is None:
    return None
  qt, kt = plan.q_layout.tile_shape, plan.kv_layout.tile_shape
  if math.prod(qt) != 2 * _ROWS:
    return None
  per_dim = [window_segments(mask, d, q, k) for d, (q, k) in enumerate(zip(qt, kt))]
  if any(p is None for p in per_dim):
    return None
  nd = len(qt)

  # Per dim and (query tile, segment): the pass matrix [q coordinates of the tile, keys of
  # the box] (query coordinates past the array see nothing), deduplicated into patterns.
  patterns, pattern_ids = [], []
  for d in range(nd):
    size = mask.spatial_shape[d]
    x = np.arange(qt[d])
    uniq, ids = {}, []
    for g, segs in enumerate(per_dim[d]):
      xq = g * qt[d] + x
      lo, hi = masks.gna_bounds_1d(np.minimum(xq, size - 1), size, mask.kernel_size[d],
                                   mask.stride[d], 1, mask.is_causal[d])
      row = []
      for origin, first, last, _ in segs:
        kc = origin + np.arange(kt[d])
        ok = ((lo[:, None] <= kc) & (kc <= hi[:, None]) & (xq[:, None] < size)
              & (first <= kc) & (kc <= last))
        row.append(uniq.setdefault(ok.tobytes(), (len(uniq), ok))[0])
      ids.append(row)
    patterns.append([ok for _, ok in uniq.values()])  # in id order (insertion order)
    pattern_ids.append(ids)

  cols = spec.mma_cols
  col_dims = [d for d in range(nd) if cols[d][0] >= 0]
  folded = [d for d in range(nd) if cols[d][0] < 0]
  width = spec.mma_width

  def table(key):  # the test matrix [W, block_kv] of per-dim patterns `key`
    ok = np.ones((width, *kt), bool)
    shape = lambda d: tuple(kt[e] if e == d else 1 for e in range(nd))
    for d in col_dims:
      offset, extent, _ = cols[d]
      ok[offset:offset + extent] = patterns[d][key[d]][:extent].reshape((extent, *shape(d)))
    if folded:
      fold = np.ones(kt, bool)
      for d in folded:
        fold = fold & patterns[d][key[d]][0].reshape(shape(d))
      offset, extent, _ = cols[col_dims[0]]
      ok[offset:offset + extent] &= fold
    return ok.reshape(width, -1)

  grid = plan.q_layout.tile_grid
  n_q = math.prod(grid)
  steps = math.prod(max(len(s) for s in per_dim[d]) for d in range(nd))
  origins = np.zeros((n_q, steps, nd), np.int32)
  counts = np.zeros((n_q, 2), np.int32)
  table_ids = np.zeros((n_q, steps), np.int32)
  tables, keys = [], {}
  for qi in range(n_q):
    g = np.unravel_index(qi, grid)
    segs = [per_dim[d][g[d]] for d in range(nd)]
    boxes = list(itertools.product(*(range(len(s)) for s in segs)))
    full = [all(segs[d][i[d]][3] for d in range(nd)) for i in boxes]
    boxes = [b for b, f in zip(boxes, full) if f] + [b for b, f in zip(boxes, full) if not f]
    counts[qi] = (sum(full), len(boxes))
    for t, b in enumerate(boxes):
      origins[qi, t] = [segs[d][b[d]][0] for d in range(nd)]
      if t >= counts[qi, 0]:
        key = tuple(pattern_ids[d][g[d]][b[d]] for d in range(nd))
        if key not in keys:
          keys[key] = len(tables)
          tables.append(table(key))
        table_ids[qi, t] = keys[key]
  if not tables:
    tables.append(np.ones((width, math.prod(kt)), bool))
  tables = np.where(np.stack(tables), 0.0, spec.mma_value).astype(jnp.bfloat16)
  return (origins, counts, _onehot(spec, 2 * _ROWS).astype(jnp.bfloat16), tables, table_ids)


_SPLIT_MAX_WIDTH = 16  # one-hot columns of a 64-row half tile (two tables per K/V slot)


@functools.lru_cache(maxsize=64)
def _split_inputs(plan: AttentionPlan, scale: float):
  """Per-warpgroup KV lists for a gathered neighborhood plan of box tiles: each compute
  warpgroup's 64 query rows (the half tile, `_half_tile`) get their own block map, whose
  visited blocks are a subset of the whole tile's, so a warpgroup skips the KV blocks only
  the other half needs. The bound is then that of 64-row query tiles (2-D 128x128 k=33:
  10.2x with 8x8 KV tiles, vs 8.9x for 128-row tiles), while K and V are loaded once per
  128-row tile.

  Step t of a q block pairs the warpgroups: blocks both halves visit are one load shared by
  both; blocks one half visits are paired with the other half's, two loads in one step;
  the longer list's leftovers run alone. Returns (onehot [128, W], tables [n, W, block_kv]
  with table 0 all zeros, loads [q blocks, L, 3], counts [q blocks, 6]) as `_kernel`
  documents, or None where this does not apply (no mask, 1-D, block maps known only at run
  time, half-tile one-hot wider than `_SPLIT_MAX_WIDTH`, tables over budget)."""
  mask = plan.mask
  if (not isinstance(mask, masks.Neighborhood) or not isinstance(plan.q_layout, TiledLayout)
      or not isinstance(plan.kv_layout, TiledLayout)
      or not isinstance(plan.block_map.kv_ids, np.ndarray)):
    return None
  tile = plan.q_layout.tile_shape
  if math.prod(tile) != 2 * _ROWS:
    return None
  half, hd = _half_tile(tile)
  hplan = make_plan(mask, TiledLayout(mask.spatial_shape, mask.dilation, half), plan.kv_layout)
  spec = _mma_spec(hplan, _ROWS, scale)
  if spec is None or spec.mma_width > _SPLIT_MAX_WIDTH:
    return None
  built = mma_masks.tables(hplan, spec, _ROWS, plan.block_kv, True)
  if built is None:
    return None
  tables, table_ids = built
  hmap = hplan.block_map
  ids, counts, full = (np.asarray(x) for x in (hmap.kv_ids, hmap.kv_counts, hmap.kv_full_counts))
  grid, hgrid = plan.q_layout.tile_grid, hplan.q_layout.tile_grid

  def visits(g, w):
    """{kv block: its table (0 if full)} of half w of the q tile at grid position g."""
    hc = list(g)
    hc[hd] = 2 * hc[hd] + w
    if hc[hd] >= hgrid[hd]:  # only padding rows: nothing to visit
      return {}
    h = int(np.ravel_multi_index(hc, hgrid))
    # Table 0 passes everything (prepended below): full blocks and idle warpgroups.
    return {int(ids[h, t]): int(t >= full[h]) * (1 + int(table_ids[h, t]))
            for t in range(counts[h])}

  n_q = plan.block_map.num_q_blocks
  per_block = []
  for qi in range(n_q):
    g = np.unravel_index(qi, grid)
    v0, v1 = visits(g, 0), visits(g, 1)
    shared = [j for j in v0 if j in v1]
    only = [[j for j in v if j not in other] for v, other in ((v0, v1), (v1, v0))]
    loads = []  # (kv block, each warpgroup's table)
    for j in shared:
      loads.append((j, v0[j], v1[j]))
    for a, b in zip(*only):
      loads += [(a, v0[a], 0), (b, 0, v1[b])]
    n_pairs = min(len(o) for o in only)
    for j in only[0][n_pairs:]:
      loads.append((j, v0[j], 0))
    for j in only[1][n_pairs:]:
      loads.append((j, 0, v1[j]))
    active = [len(shared) + len(o) for o in only]
    per_block.append((loads, (max(active), len(loads), *active, len(shared), n_pairs)))
  max_loads = max(1, max(len(l) for l, _ in per_block))
  loads = np.zeros((n_q, max_loads, 3), np.int32)
  counts = np.zeros((n_q, 6), np.int32)
  for qi, (l, c) in enumerate(per_block):
    loads[qi, :len(l)] = np.asarray(l, np.int32).reshape(-1, 3)
    counts[qi] = c
  onehot = np.tile(_onehot(spec, _ROWS), (_COMPUTE_WGS, 1))
  tables = np.where(np.concatenate([np.ones_like(tables[:1]), tables]), 0.0, spec.mma_value)
  return onehot.astype(jnp.bfloat16), tables.astype(jnp.bfloat16), loads, counts


# Cost of a 64x64 unit of work (one warpgroup's step over 64 keys) relative to 128-key
# blocks with one list per 128-row tile, fitted on the H100 (bf16, D=128, 2-D/3-D NA and
# their stride k/2 forms; docs/experiments/h100-2026-11-23-split.json): 64-key blocks cost
# ~1.09-1.22x per unit; per-warpgroup lists another ~1.1-1.2x (their extra loads: a step
# may bring two KV tiles, and the MMA bias runs on full blocks too). So per-warpgroup lists
# pay only where they skip >= ~20% of the work: short strided rows, not dense windows.
_KV64_COST = 1.15
_SPLIT_COST = 1.38
# Each TMA copy of a KV tile (for K and for V) costs the memory warpgroup time the step
# waits on: perfectly block-sparse 3-D (stride = kernel, all blocks full, H100,
# docs/experiments/h100-2026-11-23-rows.json) ran 1.99 / 1.96 ms with a copy per row of the KV tile
# (16 rows of 8 tokens), 1.87 / 1.85 ms with 8 rows of 16, 1.75 ms as 1-D blocks (one copy):
# ~0.9% of a 128-key step per copy, in the units above (4 per 128-key step) per copy and
# load. Box copies (`_box_groups`) take 2 per tile (64 columns each, D = 128).
_TMA_COPY_COST = 0.037


# Layouts that are not TMA boxes (`_box_layout`: dilation, ragged leading dims) run on a
# permuted copy: q, k, v in and the output out through XLA, ~0.3 ms for 2-D 128x128, B=2,
# H=16, D=128 on the H100 (docs/experiments/h100-2026-11-23-ours.json, "token permutation only"):
# ~0.18 units per token and head, a third of the 2-D NA forward.
_PERMUTE_COST = 0.18


def _tma_copies(kv_tile) -> int:
  """TMA copies per K (or V) tile: 2 as a box (D = 128), else one per row."""
  return 2 if _box_groups(kv_tile) is not None else math.prod(kv_tile[:-1])


def _split_pays(bmap, split_counts) -> bool:
  """Whether per-warpgroup lists beat one list per tile for this map (`_SPLIT_COST`)."""
  union = 2 * int(np.sum(bmap.kv_counts))
  per_warpgroup = int(np.sum(split_counts[:, 2]) + np.sum(split_counts[:, 3]))
  return _SPLIT_COST * per_warpgroup < _KV64_COST * union


def window_lists(plan: AttentionPlan, scale: float, config=None):
  """`_window_inputs` where the forward runs window-anchored KV boxes for `plan` under
  `config` (`MosaicGPUConfig.kv_windows`: True where they apply; None where `window_pays`),
  else None. Not with per-warpgroup lists (``split=True``)."""
  cfg = _config(config)
  if not (cfg.mask_mma and cfg.kv_windows is not False and not cfg.split and plan.gathered
          and isinstance(plan.mask, masks.Neighborhood)
          and isinstance(plan.q_layout, TiledLayout)):
    return None
  if cfg.kv_windows is None and not window_pays(plan.mask, plan.q_layout.tile_shape,
                                                plan.kv_layout.tile_shape):
    return None
  return _window_inputs(plan, scale)


def split_lists(plan: AttentionPlan, scale: float, config=None):
  """`_split_inputs` where the forward runs per-warpgroup lists for `plan` under `config`
  (`MosaicGPUConfig.split`: True where they apply; None with 64-key KV blocks where
  `_split_pays`), else None."""
  cfg = _config(config)
  if not (cfg.mask_mma and cfg.split is not False and plan.gathered
          and (cfg.split or plan.block_kv == _ROWS)):
    return None
  split = _split_inputs(plan, scale)
  if cfg.split is None and split is not None and not _split_pays(plan.block_map, split[3]):
    return None
  return split


@functools.lru_cache(maxsize=4096)
def tile_costs(mask, q_tile: tuple, kv_tile: tuple) -> dict:
  """Modeled forward cost of a tiling per KV scheme, in 64x64 units of one warpgroup step
  (`_SPLIT_COST`): "grid" (one KV list per query tile over grid tiles), "split"
  (per-warpgroup lists, 64-key tiles), "window" (window-anchored boxes, `_window_inputs`),
  each where it applies. Visited-block counts are the simulator's, partial blocks cost as
  in its model (the MMA bias, or the element test past 32 one-hot columns), and every KV
  load adds the cost of its TMA copies (`_TMA_COPY_COST`)."""
  from jax_sparse_attn.simulate import (PARTIAL_BLOCK_COST, PARTIAL_BLOCK_COST_MMA,
                                        mma_columns, visited_blocks, window_blocks)
  kv = math.prod(kv_tile)
  half = _half_tile(q_tile)[0]
  mma = mma_columns(q_tile) <= mma_masks.MAX_WIDTH
  partial_cost = PARTIAL_BLOCK_COST_MMA if mma else PARTIAL_BLOCK_COST
  rate = 2 * kv // _ROWS * (1.0 if kv > _ROWS else _KV64_COST)

  def one_list(visited, full, copies):
    return (full + partial_cost * (visited - full)) * rate + _TMA_COPY_COST * copies * visited

  visited, full = visited_blocks(mask, q_tile, kv_tile)
  copies = _tma_copies(kv_tile)
  costs = {"grid": one_list(visited, full, copies)}
  if kv == _ROWS and mma_columns(half) <= _SPLIT_MAX_WIDTH:
    costs["split"] = (visited_blocks(mask, half, kv_tile)[0] * _SPLIT_COST
                      + _TMA_COPY_COST * copies * visited)
  # Window boxes on the GPU take box copies (2 per tile) or do not run.
  window = window_blocks(mask, q_tile, kv_tile) if mma and _window_groups(kv_tile) else None
  if window is not None:
    costs["window"] = one_list(*window, 2)
  return costs


def window_pays(mask, q_tile: tuple, kv_tile: tuple) -> bool:
  """Whether window-anchored KV boxes cost less than grid tiles (`tile_costs`)."""
  costs = tile_costs(mask, tuple(q_tile), tuple(kv_tile))
  return "window" in costs and costs["window"] < min(v for k, v in costs.items() if k != "window")


@functools.lru_cache(maxsize=256)
def auto_tiles(mask, block_q: int, block_kv: int):
  """(q tile, kv tile) for `na`'s defaults: the lowest modeled cost (`tile_costs`, over its
  KV schemes) over 128-row query tiles that are TMA boxes (last dim, and that of the half
  tile, a multiple of 8) and KV tiles of `block_kv` keys, or of 64 keys when `block_kv` is
  128; tiles that are not boxes of the layout (ragged leading dims) add the permuted copy
  (`_PERMUTE_COST`)."""
  from jax_sparse_attn.simulate import best_tile_shapes, candidate_tiles
  tiles = lambda n: candidate_tiles(mask, n, last_multiple=8)
  q_cands = [t for t in tiles(block_q) if _half_tile(t)[0][-1] % 8 == 0]
  kv_sizes = (block_kv, _ROWS) if block_kv == 2 * _ROWS else (block_kv,)
  best, best_key = None, None
  is_box = lambda t: _box_layout(TiledLayout(mask.spatial_shape, mask.dilation, t))
  for qt in q_cands if block_q == 2 * _ROWS else ():
    q_box = is_box(qt)
    for kv in kv_sizes:
      for kt in tiles(kv):
        cost = min(tile_costs(mask, qt, kt).values())
        if not (q_box and is_box(kt)):
          cost += _PERMUTE_COST * mask.num_tokens
        key = (cost, max(qt) / min(qt) + max(kt) / min(kt))
        if best_key is None or key < best_key:
          best, best_key = (qt, kt), key
  if best is None:  # no box tiles: the simulator's choice (the forward permutes)
    return best_tile_shapes(mask, block_q, block_kv, last_multiple=8)
  return best


_SMEM_LIMIT = 232448  # bytes per block on Hopper (227 KiB)


def _smem_bytes(head_dim: int, block_kv: int, stages: int, itemsize: int,
                fused_pv: bool, q_bufs: int = 1) -> int:
  """Shared memory of the kernel, bounded above (the mask buffers at their widest, 1 KiB of
  slack for barriers and alignment): Q, the K/V slots, masks, LSE and the unfused form's P."""
  q = q_bufs * _COMPUTE_WGS * (_ROWS * head_dim * itemsize + 2 * 3 * _ROWS * 4)
  kv = 2 * stages * block_kv * head_dim * itemsize
  masks = _COMPUTE_WGS * _ROWS * 32 * 2 + stages * 32 * block_kv * 2 + 1024
  p = 0 if fused_pv else _COMPUTE_WGS * _ROWS * block_kv * itemsize
  return q + kv + masks + p + _COMPUTE_WGS * _ROWS * 4 + 1024


def _stages(cfg: MosaicGPUConfig, head_dim: int, block_kv: int, itemsize: int,
            fused_pv: bool) -> int:
  """The config's stages, else 2 slots of 128 keys or up to 4 of 64 (as many as fit with
  two Q buffers, at least 2)."""
  if cfg.stages is not None:
    return cfg.stages
  if block_kv > _ROWS:
    return 2
  fits = [s for s in (4, 3) if _smem_bytes(head_dim, block_kv, s, itemsize, fused_pv, 2)
          <= _SMEM_LIMIT]
  return fits[0] if fits else 2


def _programs(cfg: MosaicGPUConfig, interpret) -> int:
  """Programs of the persistent kernel: the config's, else one per SM (3 when
  interpreting, so programs loop over several items; 132, an H100's, where no GPU is
  visible, e.g. lowering on a CPU)."""
  if cfg.programs is not None:
    return cfg.programs
  if interpret:
    return 3
  try:
    return jax.devices("gpu")[0].core_count
  except (RuntimeError, AttributeError):
    return 132


def _persistent_default(counts) -> bool:
  """Persistent programs where the static share is balanced: rows visiting about the same
  number of KV blocks (coefficient of variation <= 0.15: dense, neighborhoods without
  borders, blocked GNA, sliding windows), or short rows (mean <= 8 blocks), where the saved
  per-item start-up outweighs the imbalance. Else (causal, 3-D neighborhoods with many
  border rows, block maps only known at run time) one program per item. H100, two runs
  (README): persistent 0.92-0.93 vs 0.97-0.98 ms on 2-D NA, 0.45-0.51 vs 0.53-0.56 ms on
  2-D stride k/2 (mean 7 blocks); one program per item 3.63-3.79 vs 3.75-4.19 ms on causal;
  3-D NA within the run-to-run spread either way."""
  if not isinstance(counts, np.ndarray):
    return False
  c = counts.astype(np.float64)
  mean = c.mean() if c.size else 0.0
  return mean <= 8 or c.std() <= 0.15 * mean


def _order(counts, longest_first: bool):
  """The q blocks in visiting order: most KV blocks first (stable, so equal rows keep their
  spatial order and neighbours share KV tiles in L2), or as numbered."""
  if not longest_first:
    return jnp.arange(counts.shape[0], dtype=jnp.int32)
  if isinstance(counts, np.ndarray):
    return jnp.asarray(np.argsort(-counts, kind="stable"), jnp.int32)
  return jnp.argsort(-jnp.asarray(counts), stable=True).astype(jnp.int32)


def _extras(plan: AttentionPlan, batch: int, q_seg, kv_seg) -> list:
  """The element test's per-token vectors [batch, 1, padded length] for queries and keys:
  segment ids (padding: -1 for queries, -2 for keys, so that padding matches nothing); none
  without segment ids. (A mask function runs on kernel positions, made in-kernel.)"""
  n_q, n_kv = plan.q_layout.padded_len, plan.kv_layout.padded_len
  qx, kx = [], []
  if q_seg is not None:
    pad = lambda x, n, v: jnp.pad(jnp.asarray(x, jnp.int32), [(0, 0), (0, n - x.shape[1])],
                                  constant_values=v)
    qx.append(pad(q_seg, n_q, -1))
    kx.append(pad(kv_seg, n_kv, -2))
  if not qx:
    return []
  return [jnp.stack(qx, axis=1), jnp.stack(kx, axis=1)]


def kernel_order(x, layout):
  """[batch, n, ...] in the caller's flat order -> [batch, padded_len, ...] in kernel order
  (spatial tiles, zero padding)."""
  return layout.to_kernel(x.reshape((x.shape[0], *layout.spatial_shape, *x.shape[2:])))


def caller_order(y, layout):
  """Inverse of `kernel_order`: [batch, padded_len, ...] -> [batch, n, ...]."""
  return layout.from_kernel(y).reshape((y.shape[0], -1, *y.shape[2:]))


def _view(x, boxes: _Boxes):
  """[batch, n, heads, d] -> [batch, *spatial, heads, d]."""
  return x.reshape((x.shape[0], *boxes.spatial, *x.shape[2:]))


def _groups_of_8(tile: tuple[int, ...]) -> tuple[int, ...] | None:
  """A 2-D/3-D tile's extents with its last dim in groups of 8 rows, less unit dims (the
  shared-memory slot's box dims before its [8, 64] swizzle tiles), or None."""
  if len(tile) < 2 or tile[-1] % 8:
    return None
  return tuple(n for n in (*tile[:-1], tile[-1] // 8) if n > 1)


def _box_groups(tile: tuple[int, ...]) -> tuple[int, ...] | None:
  """A KV tile's extents in groups of 8 rows, (*tile[:-1], tile[-1] // 8) less its unit
  dims, where one TMA copy can take it (else None). A copy strides over at most 5 dims: the
  integer-indexed ones (batch, head, unit dims, the 64-column part) collapse into one, 8 x
  64 is the swizzle tile, which leaves 2: 4x4x8 and 8x16 tiles are boxes, 2x4x16 is not,
  and nor are 1-D blocks (their one copy per tile is already a box)."""
  groups = _groups_of_8(tile)
  return groups if groups and len(groups) <= 2 else None


def _window_groups(tile: tuple[int, ...]) -> tuple[int, ...] | None:
  """`_box_groups` for window boxes, whose copies go through the raw view (`_window_view`,
  the slot untiled): it strides over the tile's non-unit dims and the 64 columns, so up to
  3 non-unit dims fit the TMA's 5 (2x4x16 does)."""
  if sum(n > 1 for n in tile) > 3:
    return None
  return _groups_of_8(tile) or None


def _box_view(x, boxes: _Boxes):
  """[batch, n, heads, d] -> the box copies' view [batch, *spatial[:-1], last // 8, 8,
  heads, d // 64, 64]."""
  b, _, h, d = x.shape
  return x.reshape((b, *boxes.spatial[:-1], boxes.spatial[-1] // 8, 8, h, d // 64, 64))


def _window_view(x, boxes: _Boxes):
  """[batch, n, heads, d] -> window boxes' view [batch, *spatial, heads, d // 64, 64]: a box
  starts anywhere along the last dim (its 8 rows are the swizzle tile's)."""
  b, _, h, d = x.shape
  return x.reshape((b, *boxes.spatial, h, d // 64, 64))


def forward(q, k, v, q_seg, kv_seg, plan: AttentionPlan, scale: float, config, interpret,
            block_map=None):
  """Arrays as `triton_attention.forward` (kernel order, or the caller's flat order for
  gathered plans). Returns out like q and lse [batch, heads, n_q] float32 (natural log).
  `block_map`: a runtime map (`block_map.from_selection`, 1-D plans) instead of the plan's:
  the element test on partial blocks, one program per item."""
  cfg = _config(config)
  b, sq, h, d = q.shape
  why = unsupported(plan, d, q.dtype, q_seg is not None, scale)
  if why is not None:
    raise ValueError(f"backend='mosaic_gpu' does not support {why}")
  walked = walked_map(plan, block_map)
  if plan.gathered and (q_seg is not None
                       or not (_box_layout(plan.q_layout) and _box_layout(plan.kv_layout))):
    # Blocks that are not boxes of the caller's layout (`_box_layout`), or segment ids
    # (they come per kernel position: `ops._kernel_segments`; the box path with them hangs
    # in GPU interpret mode, so CI could not check it): permute.
    ql, kl = plan.q_layout, plan.kv_layout
    # Q and K/V grids differ on context-parallel shards (a slab and its halo).
    out, lse = forward(kernel_order(q, ql), kernel_order(k, kl), kernel_order(v, kl), q_seg,
                       kv_seg, gathered(plan, False), scale, cfg, interpret)
    return caller_order(out, ql), caller_order(lse.transpose(0, 2, 1), ql).transpose(0, 2, 1)
  dpad = _padded_head_dim(d)
  if dpad != d:
    pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, dpad - d)])
    out, lse = forward(pad(q), pad(k), pad(v), q_seg, kv_seg, plan, scale, cfg, interpret,
                       block_map)
    return out[..., :d], lse
  hkv = k.shape[2]
  fused_pv = cfg.fused_pv if cfg.fused_pv is not None else not interpret
  itemsize = jnp.dtype(q.dtype).itemsize
  stages = _stages(cfg, d, plan.block_kv, itemsize, fused_pv)
  smem = _smem_bytes(d, plan.block_kv, stages, itemsize, fused_pv)
  # A second Q buffer, where it fits, lets the next item's Q load during this one.
  two_q = _smem_bytes(d, plan.block_kv, stages, itemsize, fused_pv, q_bufs=2)
  q_bufs = 2 if two_q <= _SMEM_LIMIT else 1
  if smem > _SMEM_LIMIT:
    raise ValueError(f"MosaicGPUConfig.stages={stages} needs {smem} bytes of shared memory "
                     f"with head_dim {d} and block_kv {plan.block_kv} (at most {_SMEM_LIMIT}"
                     f" on Hopper): use fewer stages or block_kv=64")
  if plan.gathered:
    qb, kb = _boxes(plan.q_layout), _boxes(plan.kv_layout)
  else:  # kernel order: 1-D blocks
    qb = _boxes(SequenceLayout(plan.q_layout.padded_len, plan.block_q))
    kb = _boxes(SequenceLayout(plan.kv_layout.padded_len, plan.block_kv))
  half, half_dim = _half_tile(qb.tile)
  bmap = plan.block_map
  box_ok = cfg.box_copies is not False and fused_pv and (cfg.box_copies or not interpret)
  # On the GPU window boxes need box copies: Mosaic's row copies start a tiled dim only on
  # a multiple of 8 rows.
  # Mask functions and segment ids: the element test (segment ids as vectors, `_extras`).
  extras = plan.mask_fn is not None or q_seg is not None
  runtime = block_map is not None
  window = (window_lists(plan, scale, cfg) if not extras and not runtime
            and (interpret or (box_ok and _window_groups(kb.tile))) else None)
  split = None if window is not None or extras or runtime else split_lists(plan, scale, cfg)
  if window is not None:
    origins, counts_np, onehot, tables, table_ids = window
    ids, counts = jnp.asarray(origins), jnp.asarray(counts_np)
    mask_arrays = [jnp.asarray(onehot), jnp.asarray(tables), jnp.asarray(table_ids)]
    width, row_counts = onehot.shape[1], counts_np[:, 1]
  elif split is not None:
    onehot, tables, loads, counts_np = split
    ids, counts = jnp.asarray(loads), jnp.asarray(counts_np)
    mask_arrays = [jnp.asarray(onehot), jnp.asarray(tables)]
    width, row_counts = onehot.shape[1], counts_np[:, 0]
  else:
    # A runtime map's rows are per (batch, head, q block) (`_kernel`'s ``per_head``); q
    # blocks are visited in the static map's order either way.
    ids = jnp.asarray(walked.kv_ids, jnp.int32).reshape(-1, walked.max_kv)
    counts = jnp.stack([jnp.asarray(walked.kv_full_counts, jnp.int32),
                        jnp.asarray(walked.kv_counts, jnp.int32)], axis=-1).reshape(-1, 2)
    row_counts = bmap.kv_counts
    mma = _mma_inputs(plan, scale) if cfg.mask_mma and not extras and not runtime else None
    if mma is None:
      mask_arrays = [jnp.asarray(x, jnp.int32) for x in (plan.q_lo, plan.q_hi, plan.kv_c)]
      mask_arrays += _extras(plan, b, q_seg, kv_seg)
      width = 0
    else:
      onehot, tables, table_ids = mma
      mask_arrays = [jnp.asarray(onehot), jnp.asarray(tables), jnp.asarray(table_ids)]
      width = onehot.shape[1]
  padded = tuple(g * t for g, t in zip(qb.grid, qb.tile))
  items = bmap.num_q_blocks * h * b
  persistent = (cfg.persistent if cfg.persistent is not None
                else not runtime and _persistent_default(row_counts))
  programs = min(items, _programs(cfg, interpret)) if persistent else items
  box = None
  if box_ok:
    box = _window_groups(kb.tile) if window is not None else _box_groups(kb.tile)
  kv_view = _view if box is None else _window_view if window is not None else _box_view
  kernel = functools.partial(
      _kernel, qb=qb, kb=kb, half=half, half_dim=half_dim, head_dim=d, heads=h,
      groups=h // hkv, dims=plan.num_mask_dims, stages=stages, q_bufs=q_bufs,
      programs=programs, items=items, scale=scale, dtype=q.dtype, fused_pv=fused_pv,
      mma_width=width, split=split is not None, box=box, window=window is not None,
      mask_fn=plan.mask_fn, segments=q_seg is not None, per_head=runtime)
  out, lse = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((b, *qb.spatial, h, d), q.dtype),
                jax.ShapeDtypeStruct((b, h, *padded), jnp.float32)),
      grid=(programs,),
      grid_names=("prog",),
      num_threads=_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else False,
  )(_order(row_counts, cfg.longest_first), ids, counts, _view(q, qb), kv_view(k, kb),
    kv_view(v, kb), *mask_arrays)
  lse = lse[(slice(None), slice(None), *(slice(0, s) for s in qb.spatial))]
  return out.reshape(q.shape), lse.reshape(b, h, sq)
