"""Block maps: every attended pair is covered, no visited block is empty, full is full."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from jax_sparse_attn import block_map, masks, simulate
from jax_sparse_attn.layout import SequenceLayout, TiledLayout
from jax_sparse_attn.plan import make_plan
from jax_sparse_attn.simulate import partial_block_cost
from strategies import gna_problems

BLOCKS = st.sampled_from([1, 2, 4, 8, 16])


def _check_map(bmap, dense_pairs, q_valid):
  """dense_pairs: [padded_q, padded_kv] bool in kernel order (padding rows/cols False)."""
  bq, bk = bmap.block_q, bmap.block_kv
  nq, nk = bmap.num_q_blocks, bmap.num_kv_blocks
  blocks = dense_pairs.reshape(nq, bq, nk, bk).transpose(0, 2, 1, 3)
  classes = bmap.dense_classes()
  any_pair = blocks.any(axis=(2, 3))
  # Covered: every block with an attended pair is visited; visited blocks are non-empty.
  np.testing.assert_array_equal(classes > 0, any_pair)
  # Full blocks really are full for every real query row.
  for i, j in zip(*np.nonzero(classes == block_map.FULL)):
    rows = blocks[i, j]
    assert rows[q_valid.reshape(nq, bq)[i]].all(), (i, j)
  # Transposed map is the transpose.
  t = np.zeros((nk, nq), np.int8)
  for j in range(nk):
    for r in range(bmap.q_counts[j]):
      t[j, bmap.q_ids[j, r]] = block_map.FULL if r < bmap.q_full_counts[j] else block_map.PARTIAL
  np.testing.assert_array_equal(t.T, classes)
  # Full first, padding repeats the last id.
  for i in range(nq):
    c = bmap.kv_counts[i]
    if c:
      assert np.all(bmap.kv_ids[i, c:] == bmap.kv_ids[i, c - 1])


def _kernel_order_pairs(plan, mask):
  q_idx, q_valid = plan.q_layout.token_index()
  kv_idx, kv_valid = plan.kv_layout.token_index()
  m = np.asarray(mask(q_idx[:, None], kv_idx[None, :]))
  return m & q_valid[:, None] & kv_valid[None, :], q_valid


MASKS_1D = [
    lambda n: masks.causal(),
    lambda n: masks.causal(offset=-3),
    lambda n: masks.sliding_window(5),
    lambda n: masks.sliding_window(3, 7),
    lambda n: masks.block_local(6, 2),
    lambda n: masks.causal() & masks.sliding_window(9),
    lambda n: masks.full(),
    lambda n: masks.from_function(lambda q, k: (q // 3) % 2 == (k // 3) % 2),
    lambda n: masks.causal() | masks.sliding_window(2, 2),
    lambda n: masks.from_array(np.random.default_rng(n).random((n, n)) < 0.1),
    lambda n: masks.causal() & (masks.sliding_window(6) | masks.sink(3)),
    lambda n: masks.causal() & masks.from_function(lambda q, k: (q - k) % 4 != 1),
]


@given(st.integers(1, 70), BLOCKS, BLOCKS, st.integers(0, len(MASKS_1D) - 1))
def test_sequence_block_maps(n, bq, bk, which):
  mask = MASKS_1D[which](n)
  plan = make_plan(mask, SequenceLayout(n, bq), SequenceLayout(n, bk))
  _check_map(plan.block_map, *_kernel_order_pairs(plan, mask))


@given(gna_problems(max_len=10), st.data())
def test_tiled_neighborhood_block_maps(problem, data):
  mask = masks.neighborhood(*problem)
  nd = len(problem[0])
  q_tile = tuple(data.draw(st.sampled_from([1, 2, 4])) for _ in range(nd))
  kv_tile = tuple(data.draw(st.sampled_from([1, 2, 4])) for _ in range(nd))
  plan = make_plan(mask, TiledLayout(problem[0], problem[3], q_tile),
                   TiledLayout(problem[0], problem[3], kv_tile))
  _check_map(plan.block_map, *_kernel_order_pairs(plan, mask))


def test_sliding_window_map_is_banded_and_linear():
  # 32k tokens, window 2048, 128 blocks: 17 visited per row at most (16 full + diagonal).
  bmap = block_map.for_sequences(masks.sliding_window(2047), 32768, 32768, 128, 128)
  assert bmap.max_kv <= 32 and int(bmap.kv_counts.max()) == 17
  assert bmap.num_visited < 256 * 18


def test_sink_window_map_is_composed_not_dense():
  import time
  t = time.perf_counter()
  mask = masks.causal() & (masks.sliding_window(2047) | masks.sink(4))
  bmap = block_map.for_sequences(mask, 32768, 32768, 128, 128)
  assert time.perf_counter() - t < 20
  # Window rows plus the sink column (block 0) once the window has moved past it.
  assert int(bmap.kv_counts.max()) == 18 and 0 in bmap.kv_ids[-1, : bmap.kv_counts[-1]]


def test_layout_roundtrip():
  import jax.numpy as jnp
  lay = TiledLayout((5, 7, 6), (2, 1, 3), (2, 4, 2))
  x = jnp.arange(2 * 5 * 7 * 6 * 3, dtype=jnp.float32).reshape(2, 5, 7, 6, 3)
  y = lay.to_kernel(x)
  assert y.shape == (2, lay.padded_len, 3)
  np.testing.assert_array_equal(lay.from_kernel(y), x)
  # token_index agrees with the permutation.
  idx, valid = lay.token_index()
  flat = np.asarray(x).reshape(2, -1, 3)
  np.testing.assert_array_equal(np.asarray(y)[:, valid], flat[:, idx[valid]])
  assert np.all(np.asarray(y)[:, ~valid] == 0)


def test_simulator_matches_block_map_and_perf_md():
  r = simulate((128, 128), (33, 33), block_q=128, block_kv=128)
  assert abs(r.ideal_speedup - 15.04) < 0.01
  assert r.block_speedup_bound >= 8.5
  mask = masks.neighborhood((128, 128), 33)
  plan = make_plan(mask, TiledLayout((128, 128), (1, 1), r.q_tile_shape),
                   TiledLayout((128, 128), (1, 1), r.kv_tile_shape))
  assert plan.block_map.num_visited == r.visited_blocks
  assert plan.block_map.num_full == r.full_blocks
  r3 = simulate((16, 64, 64), (8, 16, 16))
  assert r3.ideal_speedup == 32.0 and r3.block_speedup_bound > 15.5
  # Stride = kernel (blocked attention) with matching tiles is perfectly block-sparse.
  rs = simulate((64, 64), (8, 16), stride=(8, 16), q_tile_shape=(8, 16), kv_tile_shape=(8, 16))
  assert rs.partial_blocks == 0 and rs.block_speedup_bound == pytest.approx(rs.ideal_speedup)


def test_simulator_block_q_options():
  # 2-D k13: 8x8 query tiles (64 rows) beat 128-row ones under the cost model (their extra
  # per-element cost is smaller than the visits saved); k33: 128-row tiles win.
  r = simulate((128, 128), 13, block_q=128, block_kv=64, block_q_options=(64,))
  assert r.q_tile_shape == (8, 8) and r.block_q == 64
  assert simulate((128, 128), 13, block_q=128, block_kv=64).block_q == 128
  r = simulate((128, 128), (33, 33), block_q=128, block_kv=64, block_q_options=(64,))
  assert r.block_q == 128 and sorted(r.q_tile_shape) == [8, 16]
  # Partial blocks cost 1.06x with an MMA bias of <= 32 columns on either side, else 1.55x.
  assert partial_block_cost((4, 4, 8), (4, 4, 4)) == 1.06
  assert partial_block_cost((64,), (32,)) == 1.06
  assert partial_block_cost((64,), (64,)) == 1.55
  with pytest.raises(ValueError, match="powers of two, got 48"):
    simulate((32, 32), 5, block_q_options=(48,))


def test_best_tiles_last_multiple():
  """Mosaic GPU's TMA rows: tiles whose last dim is a multiple of 8 when any qualifies."""
  from jax_sparse_attn.simulate import best_tile_shapes
  mask = masks.neighborhood((128, 128), (33, 3))  # a tall window: free choice (128, 1)
  assert best_tile_shapes(mask, 128, 128) == ((128, 1), (128, 1))
  q, kv = best_tile_shapes(mask, 128, 128, last_multiple=8)
  assert q[-1] % 8 == 0 and kv[-1] % 8 == 0
  # A last dim of 4 tokens cannot qualify: the constraint is dropped, not an error.
  q, kv = best_tile_shapes(masks.neighborhood((64, 4), (5, 3)), 128, 64, last_multiple=8)
  assert q[-1] <= 4


def test_small_grids_pad_least():
  """A grid smaller than a block (NAT's 7×7 last stage at 128-token tiles) takes the tiles
  that pad it least: one block, not a block per row ((1, 128) made 7×7 blocks of 49 keys)."""
  import jax_sparse_attn as jsa
  from jax_sparse_attn.simulate import best_tile_shapes, candidate_tiles
  from jax_sparse_attn.layout import TiledLayout
  from pallas_kernels.gpu.mosaic_gpu import cost
  mask = masks.neighborhood((8, 8), 3)
  assert sorted(candidate_tiles(mask, 128)) == [(8, 16), (16, 8)]
  assert candidate_tiles(mask, 128, last_multiple=32) == []  # best_tile_shapes drops it
  assert candidate_tiles(mask, 64) == [(8, 8)]  # fits: unchanged
  for mask in (masks.neighborhood((7, 7), 7), masks.neighborhood((2, 5, 5), (2, 3, 3))):
    padded = lambda t: TiledLayout(mask.spatial_shape, mask.dilation, t).padded_len
    for q, kv in (best_tile_shapes(mask, 128, 128), best_tile_shapes(mask, 128, 128, same=True),
                  best_tile_shapes(mask, 128, 128, last_multiple=8)):
      assert padded(q) == padded(kv) == 128, (q, kv)
    q, kv = cost.auto_tiles(mask, 128, 128)  # KV tiles of 128 keys or 64
    assert padded(q) == 128 and padded(kv) <= 128, (q, kv)
  assert jsa.na_tiling((8, 8), 3).num_tokens == 128


@given(gna_problems(max_len=10), st.data())
def test_partial_groups_only_skip_dims_that_are_full(problem, data):
  """Every partial entry of group g is exactly masked by testing only partial_groups[g]."""
  mask = masks.neighborhood(*problem)
  nd = len(problem[0])
  tile = tuple(data.draw(st.sampled_from([1, 2, 4])) for _ in range(nd))
  lay = TiledLayout(problem[0], problem[3], tile)
  plan = make_plan(mask, lay, lay)
  bmap = plan.block_map
  assert len(bmap.partial_groups) == 2 ** nd - 1
  pairs, q_valid = _kernel_order_pairs(plan, mask)
  bq = bk = lay.block
  for i in range(bmap.num_q_blocks):
    start = bmap.kv_full_counts[i]
    for g, dims in enumerate(bmap.partial_groups):
      end = bmap.kv_group_ends[i, g]
      for j in bmap.kv_ids[i, start:end]:
        q = np.arange(i * bq, (i + 1) * bq)
        k = np.arange(j * bk, (j + 1) * bk)
        m = np.ones((bq, bk), bool)
        for d in dims:
          c = plan.kv_c[d][k][None, :]
          m &= (plan.q_lo[d][q][:, None] <= c) & (c <= plan.q_hi[d][q][:, None])
        rows = q_valid[q]
        np.testing.assert_array_equal(m[rows], pairs[np.ix_(q, k)][rows])
      start = end
    assert start == bmap.kv_counts[i]


def test_simulate_cli_writes_json(tmp_path, capsys):
  import json
  import sys
  sim_module = sys.modules["jax_sparse_attn.simulate"]
  out = tmp_path / "sim.json"
  sim_module.main(["--shape", "32", "48", "--kernel", "7", "--stride", "1", "2",
                   "--block-q", "64", "--block-kv", "64", "--json", str(out)])
  printed = capsys.readouterr().out
  data = json.loads(out.read_text())
  assert data["stride"] == [1, 2] and data["visited_blocks"] > 0
  assert "bound" in printed and f"{data['block_speedup_bound']:.1f}x" in printed


def test_memory_floor():
  """Q, K, V read and O written once: 2-D 128x128, B=2, H=16, D=128 bf16 is 4 x 67.1 MB
  (0.188 ms at 2.85 TB/s); GQA reads fewer K/V bytes; the CLI prints the lower of the block
  bound and the floor's speedup; bad sizes name the argument."""
  from jax_sparse_attn.simulate import memory_floor_ms
  floor = memory_floor_ms(16384, 2, 16, 128, tbps=2.85)
  assert abs(floor - 4 * 2 * 16384 * 16 * 128 * 2 / 2.85e9) < 1e-12
  assert abs(floor - 0.1884) < 1e-3
  assert memory_floor_ms(16384, 2, 16, 128, kv_heads=4) == 0.625 * floor
  for kwargs, match in [(dict(batch=0), "batch must be a positive int"),
                        (dict(head_dim=64.0), "head_dim must be a positive int"),
                        (dict(tbps=0), "tbps must be positive")]:
    args = dict(tokens=16384, batch=2, heads=16, head_dim=128) | kwargs
    with pytest.raises(ValueError, match=match):
      memory_floor_ms(**args)


def test_memory_floor_cli(capsys):
  import sys
  sim_module = sys.modules["jax_sparse_attn.simulate"]
  sim_module.main(["--shape", "128", "128", "--kernel", "16", "--stride", "16",
                   "--dense-ms", "7.03", "--batch", "2"])
  printed = capsys.readouterr().out
  assert "memory floor 0.188 ms (37.3x" in printed and "at most 37.3x" in printed
