"""Wall time against GPU time of a fwd+bwd step, and what XLA's command buffers (CUDA graphs)
cost around our kernels: per case (`profile_step`'s, `moba` included) the step timed as the
benchmarks time it (`demo.time_ms`: back-to-back calls, one sync) and its GPU time and span
under the profiler, in this process and in a child process with command buffers off
(``XLA_FLAGS=--xla_gpu_enable_command_buffer=``).

    python -m benchmarks.diag.diag_dispatch --cases moba,lm,window --out x.json
"""
import json
import os
import subprocess
import sys

from jax_sparse_attn.demo import time_ms

from . import Rows, case_parser
from .profile_step import _step, profile


def measure(names: str) -> list[dict]:
  rows = []
  for name in names.split(","):
    step, big = _step(name)
    row = {"case": name, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    for iters in (5, 20, 50):
      row[f"wall_ms_iters{iters}"] = round(time_ms(step, *big, iters=iters, repeats=5,
                                                   warmup=3), 4)
    prof = profile(step, big, 20)
    row.update(gpu_us_per_step=prof["gpu_us_per_step"],
               gpu_span_us_per_step=prof["gpu_span_us_per_step"],
               gpu_idle_us_per_step=prof["gpu_idle_us_per_step"],
               host_top=prof["host_us_per_step"][:12])
    row["wall_ms_after_profile"] = round(time_ms(step, *big, iters=20, repeats=5), 4)
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def main():
  parser = case_parser("moba,lm,window")
  parser.add_argument("--child", action="store_true")
  args = parser.parse_args()
  if args.child:
    print("ROWS " + json.dumps(measure(args.cases)), flush=True)
    return
  rows = Rows()
  for row in measure(args.cases):
    rows.record(**row)
  rows.write(args.out)
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                                    + " --xla_gpu_enable_command_buffer=").strip())
  out = subprocess.run([sys.executable, "-m", "benchmarks.diag.diag_dispatch", "--child",
                        "--cases", args.cases], env=env, capture_output=True, text=True)
  for line in out.stdout.splitlines():
    if line.startswith("ROWS "):
      for row in json.loads(line[5:]):
        rows.record(**row)
  if out.returncode:
    rows.record(child_error=out.stderr[-3000:])
  rows.write(args.out)


if __name__ == "__main__":
  main()
