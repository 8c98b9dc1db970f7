"""Plot measured sparse speedup over our dense kernel against the simulator's block bound.

    python -m benchmarks.plot_speedup benchmarks/results/h100-2026-11-23-ours.json out.png

Needs matplotlib (not a dependency of the package).
"""
from __future__ import annotations

import json
import sys


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


def main(argv=None):
  argv = argv or sys.argv[1:]
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  data = json.load(open(argv[0]))
  pts = points(data["results"])
  fig, ax = plt.subplots(figsize=(10, 5))
  top = max(b for _, b, _ in pts) * 1.1
  ax.plot([1, top], [1, top], "k--", lw=1, label="measured = bound")
  ax.plot([1, top], [0.85, 0.85 * top], ":", color="gray", lw=1, label="0.85 x bound (target)")
  markers = "osD^vP*Xh"
  for i, (name, bound, measured) in enumerate(pts):
    ax.scatter(bound, measured, s=45, marker=markers[i % len(markers)],
               label=f"{name} ({measured / bound:.2f} of bound)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("simulator block bound (dense blocks / visited blocks)")
  ax.set_ylabel("measured forward speedup over our dense kernel")
  ax.set_title(f"{data['device']}, bf16, {data['date']}")
  ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7)
  fig.tight_layout()
  fig.savefig(argv[1], dpi=110)
  for p in pts:
    print(f"{p[0]:<60} bound {p[1]:6.2f}  measured {p[2]:6.2f}  ({p[2] / p[1]:.2f})")


if __name__ == "__main__":
  main()
