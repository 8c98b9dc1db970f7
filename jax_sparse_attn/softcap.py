"""Logit soft-capping (Gemma 2, Grok-1): each score z = q·k·scale becomes cap·tanh(z / cap)
before the mask and the softmax, so that scores stay within (-cap, cap).

Kernels work on scores in log2 units (z·log2 e, for exp2): there the cap is cap·log2 e
(`capped2`). The backward multiplies dS, the gradient of the capped score, by the cap's
slope 1 - tanh² (`slope2`), taken from the capped score itself.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

LOG2E = math.log2(math.e)
# Scores (log2 units) below this are masked by an MMA bias (`mma_masks.MASKED` = -2**20
# before any cap): `capped2(..., floor=True)` keeps them, so they stay masked.
FLOOR = -2.0 ** 19


def check(cap) -> float | None:
  """`logits_soft_cap` as a float, or None: a positive finite number (compiled into the
  kernels), else ValueError."""
  if cap is None:
    return None
  if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) \
      or cap <= 0:
    raise ValueError(f"logits_soft_cap must be a positive finite Python number or None, got "
                     f"{cap!r}")
  return float(cap)


def capped(z, cap: float | None):
  """cap·tanh(z / cap) of scores in natural units; `cap` None: z."""
  return z if cap is None else cap * jnp.tanh(z * (1.0 / cap))


def capped2(z2, cap: float | None, floor: bool = False):
  """`capped` of scores in log2 units (z·log2 e). ``floor``: scores below `FLOOR` (an MMA
  bias' masked entries) are kept as they are."""
  if cap is None:
    return z2
  cap2 = cap * LOG2E
  out = cap2 * jnp.tanh(z2 * (1.0 / cap2))
  return jnp.where(z2 < FLOOR, z2, out) if floor else out


def slope(c, cap: float):
  """d capped / d z at a capped score `c` in natural units: 1 - tanh², 0 at masked scores
  (-inf, or an MMA bias' floor: their probability is 0, and 0 · slope must stay 0)."""
  t = jnp.minimum(jnp.maximum(c * (1.0 / cap), -1.0), 1.0)
  return 1.0 - t * t


def slope2(c2, cap: float):
  """`slope` of a capped score in log2 units."""
  return slope(c2, cap * LOG2E)
