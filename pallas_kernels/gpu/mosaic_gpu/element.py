"""The element test of partial blocks in the Hopper kernels: which per-token vectors they read
(`mask_vectors`) and how per-dim interval tests combine (`mask_intervals`)."""
from __future__ import annotations

import jax.numpy as jnp

from jax_sparse_attn.plan import AttentionPlan, any_term

# Unions of interval masks (`AttentionPlan.union`, e.g. ``causal & (window | sink)``) tested
# as intervals per term, an OR of ANDs, instead of running the mask function on the kernel
# positions (False: the mask function; a lab knob).
UNION_TERMS = True


def mask_vectors(plan: AttentionPlan):
  """(lo, hi, c, terms, mask_fn) of the element test: the union's interval vectors (T * D
  rows, `masks.union_intervals`) and no mask function where the plan has them, else the
  plan's intervals (one term) and its mask function."""
  if UNION_TERMS and plan.union is not None:
    terms, lo, hi, c = plan.union
    return lo, hi, c, terms, None
  return plan.q_lo, plan.q_hi, plan.kv_c, 1, plan.mask_fn


def _zero_out(ok, x):
  return jnp.where(ok, x, 0.0)


def mask_intervals(x, test, dims: int, terms: int, where=_zero_out):
  """``x`` masked by the element test, ``where(ok, x)``: once per dim (one term), or once
  with the union's OR of ANDs (`plan.any_term`; ``test(d)`` is row d's boolean tile,
  ``lo[d] <= c[d] <= hi[d]``). The default zeroes P where the test fails (the backward
  kernels); the forward passes its own (-inf, or the tests' running AND)."""
  if terms > 1:
    return where(any_term(test, range(dims), terms), x)
  for d in range(dims):
    x = where(test(d), x)
  return x
