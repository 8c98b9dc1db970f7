"""Plot measured sparse speedup over our dense kernel against the simulator's block bound.

    python -m benchmarks.diag.plot_speedup docs/experiments/h100-2026-11-23-ours.json out.png \
        [--mosaic DIAG.json BASELINES.json]

The first file is a `bench_gpu` run (Triton kernels; rows carry their bound). With
`--mosaic` the points come instead from a `diag_mosaic_gpu` run: the default rows of both
backends, each over its own dense kernel (the same run's S=16384 row, else the baselines
file), beside the bound of the tiles `na` picks for that backend (computed here; at 64-row
query granularity where the Hopper kernel splits the tile between its warpgroups, and of
window-anchored KV boxes where it takes them). Dense baselines match on tokens and batch. Needs
matplotlib (not a dependency of the package).
"""
from __future__ import annotations

import json
import math
import re
import sys

from pallas_kernels.gpu.mosaic_gpu import boxes as mg_boxes
from pallas_kernels.gpu.mosaic_gpu import cost as mg_cost


def points(results):
  dense = {}
  for r in results:
    if r.get("impl") == "ours-triton" and "dense baseline" in r["case"] and "fwd_ms" in r:
      dense[r["case"].split()[0]] = r["fwd_ms"]
  out = []
  for r in results:
    if r.get("impl") == "ours-triton" and "bound" in r and "fwd_ms" in r:
      base = dense.get(r["case"].split()[0])
      if base:
        out.append((r["case"], r["bound"], base / r["fwd_ms"]))
  return out


def _problem(case: str):
  """'na3d 16x64x64 k8x16x16 s(4, 8, 8) B=1' -> (spatial, kernel, stride)."""
  m = re.match(r"na\dd ([\dx]+) k([\dx]+) s(\d+|\([\d, ]+\)) B=\d+$", case)
  if not m:
    return None
  dims = lambda s: tuple(int(x) for x in s.split("x"))
  stride = m.group(3)
  stride = int(stride) if stride.isdigit() else tuple(int(x) for x in stride[1:-1].split(","))
  return dims(m.group(1)), dims(m.group(2)), stride


def _splits(mask, qt, kt) -> bool:
  """Whether the Hopper forward runs these tiles with per-warpgroup KV lists by default."""
  from jax_sparse_attn.layout import TiledLayout
  from jax_sparse_attn.plan import gathered, make_plan
  ones = (1,) * len(qt)
  plan = gathered(make_plan(mask, TiledLayout(mask.spatial_shape, ones, qt),
                            TiledLayout(mask.spatial_shape, ones, kt)))
  return mg_cost.split_lists(plan, 1.0) is not None


def diag_points(results, baselines, impl_name: str):
  """(case, bound, measured) for one backend's default NA rows of a diag_mosaic_gpu run:
  speedup over the same backend's dense kernel, bound of the tiles `na` picks for it."""
  import jax.numpy as jnp
  from jax_sparse_attn import masks, ops, simulate
  impl = ops._get_backend(impl_name)
  bq, bk = impl.default_blocks(128, jnp.bfloat16)
  dense = {}  # (tokens, batch) -> ms
  for r in baselines + results:
    if r.get("impl") == impl_name and "fwd_ms" in r and "schedule" not in r:
      m = re.match(r"dense (\d+) tokens B=(\d+)|dense S=(\d+) B=(\d+)", r["case"])
      if m:
        dense[(int(m.group(1) or m.group(3)), int(m.group(2) or m.group(4)))] = r["fwd_ms"]
  out = []
  for r in results:
    prob = _problem(r["case"])
    default = (r.get("impl") == f"{impl_name} (auto tiles)"
               or (r.get("impl") == impl_name and r.get("variant") == "defaults"))
    if not default or prob is None or "fwd_ms" not in r:
      continue
    spatial, kernel, stride = prob
    batch = int(r["case"].rsplit("B=", 1)[1])
    base = dense.get((math.prod(spatial), batch))
    if base is None:
      continue
    mask = masks.neighborhood(spatial, kernel, stride)
    qt, kt = ops.auto_tiles(impl, mask, bq, bk)
    windows = impl_name == "mosaic_gpu" and mg_cost.window_pays(mask, qt, kt)
    if impl_name == "mosaic_gpu" and not windows and _splits(mask, qt, kt):
      qt = mg_boxes._half_tile(qt)[0]  # 64-row query granularity
    sim = simulate(spatial, kernel, stride, q_tile_shape=qt, kv_tile_shape=kt)
    bound = sim.window_speedup_bound if windows else sim.block_speedup_bound
    out.append((r["case"] + (" (window boxes)" if windows else ""), bound, base / r["fwd_ms"]))
  return out


def main(argv=None):
  argv = list(argv or sys.argv[1:])
  mosaic = None
  if "--mosaic" in argv:
    i = argv.index("--mosaic")
    mosaic = argv[i + 1:i + 3]
    del argv[i:i + 3]
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  data = json.load(open(argv[0]))
  if mosaic:  # both backends from the diag run
    import pallas_kernels.gpu  # noqa: F401  (registers the backends)
    diag, base = (json.load(open(f))["results"] for f in mosaic)
    data = json.load(open(mosaic[0]))
    series = [(name, marker, diag_points(diag, base, name))
              for name, marker in (("triton", "o"), ("mosaic_gpu", "^"))]
  else:
    series = [("triton", "o", points(data["results"]))]
  pts = [p for _, _, s in series for p in s]
  fig, ax = plt.subplots(figsize=(11, 5.5))
  top = max(b for _, b, _ in pts) * 1.1
  ax.plot([1, top], [1, top], "k--", lw=1, label="measured = bound")
  ax.plot([1, top], [0.85, 0.85 * top], ":", color="gray", lw=1, label="0.85 x bound (target)")
  for impl, marker, s in series:
    for name, bound, measured in s:
      ax.scatter(bound, measured, s=45, marker=marker,
                 label=f"{impl}: {name} ({measured / bound:.2f} of bound)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("simulator block bound (dense blocks / visited blocks)")
  ax.set_ylabel("measured forward speedup over our dense kernel")
  ax.set_title(f"{data['device']}, bf16, {data['date']}")
  ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7)
  fig.tight_layout()
  fig.savefig(argv[1], dpi=110)
  for impl, _, s in series:
    for p in s:
      print(f"{impl:<11} {p[0]:<60} bound {p[1]:6.2f}  measured {p[2]:6.2f}  "
            f"({p[2] / p[1]:.2f})")


if __name__ == "__main__":
  main()
