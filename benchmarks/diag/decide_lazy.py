"""The decision rule of the conditional-rescale A/B (`diag_fwd_forms --switch LAZY_RESCALE`,
`run_device.sh lazy`), written before the call: the kept max with its branch ("lazy8") goes on
where its small checks against float32 XLA hold (within 6e-3, finite) and its median forward
is at least 2% faster than the running max's ("every") on at least half the cases and never
2% slower. Reads the diag's JSON lines; exit status 0: on.

    python -m benchmarks.diag.decide_lazy LINES.jsonl
"""
import json
import statistics
import sys

FORM, BASE = "lazy8", "every"


def decide(rows, form=FORM, base=BASE):
  """(on, [(case, base median ms, form median ms, ratio)])."""
  checks_ok = all(r.get(form, 1.0) < 6e-3 and r.get(form + "_finite", True)
                  for r in rows if "check" in r)
  table = []
  for r in rows:
    if "case" in r and f"{form}_fwd_ms" in r:
      a, b = statistics.median(r[f"{base}_fwd_ms"]), statistics.median(r[f"{form}_fwd_ms"])
      table.append((r["case"], a, b, b / a))
  ratios = [t[-1] for t in table]
  on = bool(checks_ok and ratios and sum(x <= 0.98 for x in ratios) * 2 >= len(ratios)
            and max(ratios) < 1.02)
  return on, table


def main():
  rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
  on, table = decide(rows)
  for case, a, b, ratio in table:
    print(f"{case}: {a:.4f} -> {b:.4f} ms ({ratio:.3f})")
  print("decision:", "on" if on else "off")
  sys.exit(0 if on else 1)


if __name__ == "__main__":
  main()
