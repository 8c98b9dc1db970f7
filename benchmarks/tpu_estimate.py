"""Paper estimate of TPU time for the PERF.md workloads (there is no TPU to measure on).

    python -m benchmarks.tpu_estimate [--efficiency 0.5] [--out results/tpu_estimate.json]

Model: the Mosaic kernels visit the blocks of the block map (128x128 blocks on TPU); each
visited block costs 4*128*128*head_dim FLOPs per (batch, head) on the MXU, partial blocks cost
`--partial-cost` times more (mask arithmetic on the VPU), and the MXU runs at `--efficiency`
of the chip's public bf16 peak. Forward+backward = 3.5x forward. These are ESTIMATES, labelled
so everywhere, until someone measures on a TPU.
"""
from __future__ import annotations

import argparse
import json

import jax_sparse_attn as jsa
from jax_sparse_attn import block_map, masks

PEAK_BF16 = {"TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6e": 918e12}  # per chip, public specs


def workloads():
  b, h, d = 2, 16, 128
  out = []
  for s in (4096, 16384):
    for name, mask in (("dense", masks.full()), ("causal", masks.causal())):
      bm = block_map.for_sequences(mask, s, s, 128, 128)
      out.append((f"{name} S={s}", b * h, d, bm.num_visited, bm.num_visited - bm.num_full))
  bm = block_map.for_sequences(masks.sliding_window(2047), 32768, 32768, 128, 128)
  out.append(("sliding window 2048 S=32768 B=1", h, d, bm.num_visited,
              bm.num_visited - bm.num_full))
  r = jsa.simulate((128, 128), (33, 33), block_q=128, block_kv=128)
  out.append(("na2d 128x128 k33 B=2", b * h, d, r.visited_blocks, r.partial_blocks))
  r = jsa.simulate((16, 64, 64), (8, 16, 16), block_q=128, block_kv=128)
  out.append(("na3d 16x64x64 k8x16x16 B=1", h, d, r.visited_blocks, r.partial_blocks))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--efficiency", type=float, default=0.5)
  parser.add_argument("--partial-cost", type=float, default=1.25)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  rows = []
  for name, bh, d, visited, partial in workloads():
    flops = 4 * 128 * 128 * d * bh * (visited + (args.partial_cost - 1) * partial)
    row = dict(workload=name, visited_blocks=visited, partial_blocks=partial)
    for chip, peak in PEAK_BF16.items():
      fwd = flops / (peak * args.efficiency) * 1e3
      row[f"{chip} fwd ms (est.)"] = round(fwd, 3)
      row[f"{chip} fwd+bwd ms (est.)"] = round(3.5 * fwd, 3)
    rows.append(row)
  keys = list(rows[0])
  print(" | ".join(keys))
  for r in rows:
    print(" | ".join(str(r[k]) for k in keys))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(note="ESTIMATE from the block-count model, not a measurement",
                     efficiency=args.efficiency, partial_cost=args.partial_cost,
                     peak_bf16=PEAK_BF16, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
