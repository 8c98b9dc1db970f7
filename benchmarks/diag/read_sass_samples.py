"""Reads Nsight Compute's source page (`ncu -i x.ncu-rep --page source --csv --print-source
sass`, as `profile_sources.sh` writes it): the warps' stall samples summed per column (stall
reason), per opcode, and the instructions that drew the most, with local-memory traffic
(LDL/STL: register spills) called out. `--bins STEP` maps the samples over the code (hex
offsets from the kernel's first instruction, with the matrix, TMA and MUFU instructions of
each bin: which code is the producer's loop and which the compute warpgroups'), `--region
LO-HI` (hex offsets) restricts the summary to one such range.

    python -m benchmarks.diag.read_sass_samples OUT/fused-sass.csv [--top 25] [--bins 400]
        [--region 1c00-4000] [--json x.json]
"""
import argparse
import collections
import csv
import json
import re

SAMPLES = "Warp Stall Sampling (All Samples)"  # every warp-state sample of an instruction


def _number(text):
  text = (text or "").replace(",", "").strip()
  try:
    return float(text)
  except ValueError:
    return None


def read(path):
  """Rows of the CSV as dicts, from its header line on (ncu prints notes before it)."""
  with open(path, newline="") as f:
    lines = f.read().splitlines()
  start = next(i for i, line in enumerate(lines) if "Source" in line and "," in line)
  return list(csv.DictReader(lines[start:]))


def opcode(source):
  """`@!P0 LDL.64 R2, [R1+0x8]` → `LDL`."""
  text = re.sub(r"^@!?U?P\w+\s+", "", (source or "").strip())
  return text.split(" ")[0].split(".")[0] if text else ""


def offset(row, base):
  """An instruction's byte offset from the kernel's first (`base`)."""
  return int(row["Address"], 16) - base


def region(rows, span):
  """The rows whose offset from the first instruction lies in ``"LO-HI"`` (hex, HI
  excluded)."""
  lo, hi = (int(x, 16) for x in span.split("-"))
  base = min(int(r["Address"], 16) for r in rows)
  return [r for r in rows if lo <= offset(r, base) < hi]


def bins(rows, step):
  """Per `step` bytes of code: (offset, share of the samples, instructions executed, the
  matrix / TMA / MUFU / spill opcodes in it, the top stall reasons)."""
  base = min(int(r["Address"], 16) for r in rows)
  total = sum(_number(r.get(SAMPLES)) or 0 for r in rows) or 1
  reasons = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
  out = {}
  for r in rows:
    b = out.setdefault(offset(r, base) // step, [0.0, 0.0, collections.Counter(),
                                                collections.Counter()])
    b[0] += _number(r.get(SAMPLES)) or 0
    b[1] += _number(r.get("Instructions Executed")) or 0
    b[2][opcode(r.get("Source"))] += 1
    for c in reasons:
      b[3][c[6:]] += _number(r.get(c)) or 0
  keep = ("HGMMA", "UTMALDG", "UTMASTG", "UTMAREDG", "MUFU", "LDL", "STL", "NANOSLEEP")
  return [(k * step, n / total, ex, {o: c for o, c in ops.items() if o in keep},
           [(x, round(v / total, 3)) for x, v in rs.most_common(3) if v])
          for k, (n, ex, ops, rs) in sorted(out.items())]


def summarize(rows, top=25):
  """Samples per column, per opcode, the spills' share and the `top` instructions (their
  share of the samples and their nonzero sample columns)."""
  numeric = [c for c in rows[0] if c not in ("Address", "Source", "# Address") and
             any(_number(r.get(c)) is not None for r in rows[:50])]
  sample_cols = [c for c in numeric if "ampl" in c or "stall" in c.lower()]
  total_col = SAMPLES if SAMPLES in sample_cols else (sample_cols[0] if sample_cols else None)
  sums = {c: sum(_number(r.get(c)) or 0 for r in rows) for c in numeric}
  by_op = collections.Counter()
  for r in rows:
    by_op[opcode(r.get("Source"))] += _number(r.get(total_col)) or 0
  total = sums.get(total_col) or 1
  ranked = sorted(rows, key=lambda r: -(_number(r.get(total_col)) or 0))[:top]
  return {
      "instructions": len(rows),
      "samples_column": total_col,
      "samples": sums.get(total_col),
      "columns": {c: sums[c] for c in numeric},
      "by_opcode": {op: round(n / total, 4) for op, n in by_op.most_common(20)},
      "local_memory_share": round(sum(n for op, n in by_op.items()
                                      if op in ("LDL", "STL")) / total, 4),
      "local_memory_instructions": sum(1 for r in rows if opcode(r.get("Source")) in
                                       ("LDL", "STL")),
      "top": [{"address": r.get("Address"), "source": (r.get("Source") or "").strip(),
               "share": round((_number(r.get(total_col)) or 0) / total, 4),
               **{c: r.get(c) for c in sample_cols if (_number(r.get(c)) or 0) > 0}}
              for r in ranked],
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("csv")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--bins", type=lambda x: int(x, 16))
  parser.add_argument("--region")
  parser.add_argument("--json")
  args = parser.parse_args()
  rows = read(args.csv)
  if args.bins:
    for off, share, ex, ops, reasons in bins(rows, args.bins):
      if share >= 0.001:
        print(f"{off:05x} {share:6.1%} {ex / 1e6:7.2f}M executed {ops} {reasons}")
  if args.region:
    total = sum(_number(r.get(SAMPLES)) or 0 for r in rows) or 1
    rows = region(rows, args.region)
    print(f"region {args.region}: {sum(_number(r.get(SAMPLES)) or 0 for r in rows) / total:.1%}"
          f" of the samples")
  s = summarize(rows, args.top)
  print(f"{s['instructions']} instructions, {s['samples']} samples ({s['samples_column']})")
  print("local memory (LDL/STL) share of samples:", s["local_memory_share"],
        f"({s['local_memory_instructions']} instructions)")
  print("by opcode:", json.dumps(s["by_opcode"]))
  reasons = {c[6:]: v for c, v in s["columns"].items() if c.startswith("stall_")
             and "Not Issued" not in c and v}
  print("stall reasons:", ", ".join(f"{k} {v / (s['samples'] or 1):.1%}" for k, v in
                                    sorted(reasons.items(), key=lambda x: -x[1])))
  for r in s["top"]:
    print(f"{r['share']:7.2%}  {r['address']}  {r['source'][:70]}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(s, f, indent=1)


if __name__ == "__main__":
  main()
