"""Strided neighborhoods' backward on a key grid that starts before the array
(`simulate.best_shifted_tiles`, `ops._backward_plan`): the choice, and gradients against the
brute force on the Triton and Hopper backward kernels (interpret mode)."""
import math

import jax.numpy as jnp
import pytest

import backend_cases
from jax_sparse_attn import masks, ops
from jax_sparse_attn.simulate import best_shifted_tiles, visited_blocks
from pallas_kernels.gpu import MosaicGPUConfig


def test_best_shifted_tiles():
  """The 3-D stride k/2 benchmark: windows start 4 past the 8-token grid in the last two
  dims (NATTEN centres them on their stride group), so a key grid led by 4 holds whole
  windows: 10368 visited blocks (6272 full) instead of the grid's 12288 (4096 full).
  No stride or a dilation: nothing to shift."""
  m = masks.neighborhood((16, 64, 64), (8, 16, 16), stride=(4, 8, 8))
  tq, tk, lead = best_shifted_tiles(m, 128, 128)
  assert lead[1:] == (4, 4) and tk[1:] == (8, 8)
  from jax_sparse_attn.simulate import _lead_counts
  per_dim = [_lead_counts(m, d, tq[d], tk[d], lead[d]) for d in range(3)]
  assert tuple(math.prod(c[i] for c in per_dim) for i in (0, 1)) == (10368, 6272)
  assert visited_blocks(m, (4, 4, 8), (8, 4, 4)) == (12288, 4096)
  assert best_shifted_tiles(masks.neighborhood((32, 32), (9, 9)), 128, 128) is None
  assert best_shifted_tiles(masks.neighborhood((32, 32), (8, 8), (4, 4), (2, 1)), 128,
                            128) is None


_2D = [((16, 24), (8, 8), (4, 4), (1, 1), (False, False)),
       ((12, 24), (4, 8), (2, 4), (1, 1), (True, False))]


# 3-D: a key grid led on both backends' blocks (Triton's 64-row ones need the larger grid;
# the Hopper one's interpret-mode cost grows with it, so it gets the smaller).
_3D_HOPPER = ((4, 10, 16), (2, 4, 8), (2, 2, 4), (1, 1, 1), (False, False, False))


# extended: each backend's other 2-D problem (CI: Triton's backward on the first, the Hopper
# backward on the second, which has a causal dim)
@pytest.mark.parametrize("backend, problem, dq", [
    ("triton", _2D[0], None), pytest.param("triton", _2D[1], None, marks=pytest.mark.extended),
    pytest.param("mosaic_gpu", _2D[0], None, marks=pytest.mark.extended),
    ("mosaic_gpu", _2D[1], None),
    ("triton", ((6, 10, 16), (4, 4, 8), (2, 2, 4), (1, 1, 1), (False, False, False)), None),
    ("mosaic_gpu", _3D_HOPPER, None), ("mosaic_gpu", _3D_HOPPER, "own")])
def test_shifted_backward(monkeypatch, backend, problem, dq):
  """Forward and gradients against the brute force (odd sizes, GQA, a causal dim) with the
  backward on a shifted key grid: the plan it ran is checked to be one. ``dq="own"``: dQ
  reduce-added by the Hopper dK/dV kernel (the default at head_dim 64 where KV blocks visit
  many Q blocks: the strided 3-D benchmark's 16)."""
  plans = backend_cases.spy_backward_plans(monkeypatch)
  kernels = backend_cases.spy_backward_kernels(monkeypatch)
  monkeypatch.setattr(ops, "SHIFTED_KV", True)
  config = (MosaicGPUConfig(backward="mosaic_gpu", backward_dq=dq) if backend == "mosaic_gpu"
            else None)
  p = dict(problem=problem, batch=1, heads=2, kv_heads=1, head_dim=64, dtype=jnp.bfloat16,
           seed=3, tile_q=None, tile_kv=None)
  backend_cases.check_na(p, backend, interpret=True, config=config)
  assert plans and plans[0] is not None and ops._kv_pads(plans[0], plans[0]) is None
  assert any(o < 0 for o in plans[0].kv_layout.origin)
  assert plans[0].mask is not None  # routing reads it (`picks_mosaic`)
  if backend == "mosaic_gpu":  # the dK/dV kernel ran, forming dQ where fused
    assert kernels and all(k["with_dq"] == (dq == "own") for k in kernels)


def test_window_dq_tile(monkeypatch):
  """The strided benchmark's dQ over window-anchored KV boxes: 8192 blocks, all full, against
  the shifted grid's 10368 (6272 full); each step's test matrix cut into the kernel's two
  64-key halves, box origins in the padded key grid (led by the shift). On the forward's
  grid (the default, `ops.SHIFTED_KV` off) the boxes pay too. An unstrided neighborhood
  keeps its map (the windows would not pay)."""
  import numpy as np
  from jax_sparse_attn.backends import get_backend
  from jax_sparse_attn.layout import TiledLayout
  from jax_sparse_attn.plan import gathered, make_plan
  from pallas_kernels.gpu.mosaic_gpu import cost, tables

  m = masks.neighborhood((16, 64, 64), (8, 16, 16), stride=(4, 8, 8))
  grid = TiledLayout((16, 64, 64), (1, 1, 1), (4, 4, 8))
  assert not ops.SHIFTED_KV
  default = ops._backward_plan(get_backend("mosaic_gpu"), m, gathered(make_plan(m, grid, grid)),
                               128, jnp.bfloat16, MosaicGPUConfig(backward="mosaic_gpu"))
  default = default or gathered(make_plan(m, grid, grid))
  assert not any(default.kv_layout.origin) and cost.window_dq_tile(default) is not None
  monkeypatch.setattr(ops, "SHIFTED_KV", True)
  # the backward's plan as `na` makes it: its key grid led by the shift
  plan = ops._backward_plan(get_backend("mosaic_gpu"), m, gathered(make_plan(m, grid, grid)),
                            128, jnp.bfloat16, MosaicGPUConfig(backward="mosaic_gpu"))
  lead = tuple(-o for o in plan.kv_layout.origin)
  assert int(np.sum(plan.block_map.kv_counts)) == 10368
  tile = cost.window_dq_tile(plan)
  assert tile is not None and math.prod(tile) == 128
  origins, counts, onehot, halves, ids = tables.window_dq_inputs(plan, tile, 0.1)
  assert counts.sum(0).tolist() == [8192, 8192]
  assert onehot.shape[0] == 128 and halves.shape[1:] == (onehot.shape[1], 64)
  assert ids.shape == (origins.shape[0], 2 * origins.shape[1])
  assert np.all(ids[:, 1::2] == ids[:, ::2] + 1)
  # every box lies in the padded key grid, and the first one of query tile 0 at the lead
  assert origins.min() >= 0 and np.all(origins.max((0, 1)) + tile <= plan.kv_layout.spatial_shape)
  assert tuple(origins[0, 0]) == lead
  plain = gathered(make_plan(masks.neighborhood((16, 64, 64), (8, 16, 16)), grid, grid))
  assert cost.window_dq_tile(plain) is None
  assert cost.window_dq_tile(plain, force=True) is not None


@pytest.mark.parametrize("problem", [_2D[1],
                                     ((4, 10, 16), (2, 4, 8), (2, 2, 4), (1, 1, 1),
                                      (False, False, True))])
def test_window_dq(monkeypatch, problem):
  """Gradients against the brute force with the dQ kernel on window-anchored KV boxes
  (`attention_bwd.WINDOW_DQ`, forced with `kv_windows=True`; boxes past the shifted grid's
  lead, partial boxes with their MMA bias, GQA, a causal dim): the path is checked to run."""
  from pallas_kernels.gpu.mosaic_gpu import attention_bwd
  ran = backend_cases.spy(monkeypatch, attention_bwd, "_dq_window", lambda a, kw, win: win)
  monkeypatch.setattr(ops, "SHIFTED_KV", True)
  p = dict(problem=problem, batch=1, heads=2, kv_heads=1, head_dim=64, dtype=jnp.bfloat16,
           seed=5, tile_q=None, tile_kv=None)
  backend_cases.check_na(p, "mosaic_gpu", interpret=True,
                         config=MosaicGPUConfig(backward="mosaic_gpu", kv_windows=True))
  assert ran and all(r is not None for r in ran)
