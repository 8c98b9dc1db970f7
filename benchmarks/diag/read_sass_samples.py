"""Reads Nsight Compute's source page (`ncu -i x.ncu-rep --page source --csv --print-source
sass`, as `profile_sources.sh` writes it): the warps' stall samples summed per column (stall
reason), per opcode, and the instructions that drew the most, with local-memory traffic
(LDL/STL: register spills) and barrier waits called out.

    python -m benchmarks.diag.read_sass_samples OUT/fused-sass.csv [--top 25] [--json x.json]
"""
import argparse
import collections
import csv
import json
import re


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


def summarize(rows, top=25):
  numeric = [c for c in rows[0] if c not in ("Address", "Source", "# Address") and
             any(_number(r.get(c)) is not None for r in rows[:50])]
  sample_cols = [c for c in numeric if "ampl" in c or "stall" in c.lower()]
  total_col = next((c for c in sample_cols if "All Samples" in c), sample_cols[0] if
                   sample_cols else None)
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
  parser.add_argument("--json")
  args = parser.parse_args()
  s = summarize(read(args.csv), args.top)
  print(f"{s['instructions']} instructions, {s['samples']} samples ({s['samples_column']})")
  print("local memory (LDL/STL) share of samples:", s["local_memory_share"],
        f"({s['local_memory_instructions']} instructions)")
  print("by opcode:", json.dumps(s["by_opcode"]))
  for r in s["top"]:
    print(f"{r['share']:7.2%}  {r['address']}  {r['source'][:70]}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(s, f, indent=1)


if __name__ == "__main__":
  main()
