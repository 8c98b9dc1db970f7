"""Resources and work scheduling of the Hopper forward: shared memory and K/V stages, persistent
programs, the order of work items."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import MosaicGPUConfig, _COMPUTE_WGS, _ROWS


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
