"""The MMA bias's host tables (`mma_masks.tables`): the keyed build (one table per distinct
relative geometry) gives every masked step the same test matrix as building each step's,
on random neighborhoods, tiles and both kernel sides; large 3-D problems stay in budget."""
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jax_sparse_attn import masks
from jax_sparse_attn.layout import TiledLayout
from jax_sparse_attn.plan import gathered, make_plan
from jax_sparse_attn.simulate import candidate_tiles
from pallas_kernels.gpu import mma_masks
from pallas_kernels.gpu.triton_attention import TritonConfig
from strategies import examples, gna_problems


def _per_step(built):
  tables, ids = built
  return tables[ids]  # [programs, steps, ...]: each step's matrix


def _check(mask, q_tile, kv_tile, rows, loop_rows, loop_is_kv, onehot):
  lay = lambda t: TiledLayout(mask.spatial_shape, mask.dilation, t)
  plan = gathered(make_plan(mask, lay(q_tile), lay(kv_tile)))
  spec = mma_masks.mask_spec(plan, False, TritonConfig(mma_onehot=onehot, single_loop=False),
                             rows, loop_rows, 0.125, loop_is_kv=loop_is_kv)
  if spec.mma_cols is None or not spec.mma_tables:
    return False
  keyed = mma_masks.tables(plan, spec, rows, loop_rows, loop_is_kv)
  every = mma_masks.tables(plan, spec, rows, loop_rows, loop_is_kv, dedup=False)
  assert (keyed is None) == (every is None)
  if keyed is not None:
    np.testing.assert_array_equal(_per_step(keyed), _per_step(every))
    assert len(keyed[0]) == len(every[0])  # both fully deduplicated
  return True


@settings(max_examples=examples(25), deadline=None)
@given(problem=gna_problems(max_ndim=3, max_len=24), data=st.data())
def test_keyed_tables_match_every_step(problem, data):
  spatial, kernel, stride, dilation, causal = problem
  mask = masks.neighborhood(spatial, kernel, stride, dilation, causal)
  sizes = [s for s in (16, 32, 64) if candidate_tiles(mask, s)]
  assume(sizes)
  size = data.draw(st.sampled_from(sizes))
  q_tile = data.draw(st.sampled_from(candidate_tiles(mask, size)))
  kv_tile = data.draw(st.sampled_from(candidate_tiles(mask, size)))
  for loop_is_kv in (True, False):
    for onehot in ("rows", "loop"):
      _check(mask, q_tile, kv_tile, size, size, loop_is_kv, onehot)


def test_large_3d_in_budget():
  """3-D NA k8x16^2 on 32x128^2 (524k tokens): 140k masked steps, a few dozen tables; the
  per-step build was over `TABLE_BUDGET` and the kernels fell back to the element test
  (the forward ran 0.69 of the 65k-token problem's rate per block on the H200)."""
  mask = masks.neighborhood((32, 128, 128), (8, 16, 16))
  lay = TiledLayout(mask.spatial_shape, mask.dilation, (4, 4, 8))
  plan = gathered(make_plan(mask, lay, lay))
  spec = mma_masks.mask_spec(plan, False, TritonConfig(mma_onehot="rows", single_loop=False),
                             128, 128, 0.125)
  assert mma_masks.tables(plan, spec, 128, 128, True, dedup=False) is None  # over budget
  tables, ids = mma_masks.tables(plan, spec, 128, 128, True)
  assert len(tables) < 64 and (ids > 0).sum() > 100_000
