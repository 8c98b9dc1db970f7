"""The Hopper forward's turns on the tensor cores as named hardware barriers
(`attention_fwd.NAMED_TURN`: `bar.sync` / `bar.arrive`, one of each per step) against the
shared-memory barrier both warpgroups meet at twice per step (the default), at the
headline's sizes: forward ms (fwd+bwd on a few rows), both forms alternating in one process,
the outputs compared with each other (the arithmetic is the same: bitwise equal) and with
float32 XLA at small sizes; then ptxas' registers and spills of the named form's forward
kernels (a child process: `MOSAIC_GPU_DUMP_PTXAS=1`).

    python -m benchmarks.diag.diag_named_turn --out DIR [--cases dense,causal,...]
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from . import Rows, child_done

CASES = "dense,causal,window,gna1d,gna2d,gna3d,strided,blocksparse,d64"
# name: `attention_fwd.NAMED_TURN`
FORMS = {"mbarrier": False, "named": True}


def _cases(names):
  from benchmarks import cli
  built = cli.suites(quick=False)
  out = []
  for name in names:
    if name == "d64":  # head_dim 64: dense S=16384 at B=2, H=16
      out += [c for c in cli.suites(quick=False, head_dim=64)["dense"]() if "16384" in c.name]
    else:
      out += [c for c in built[name]() if "4096" not in c.name]
  return out


def _set_form(fwd_module, form):
  """`attention_fwd.NAMED_TURN` for the kernels traced next: the op's cached custom_vjp and
  jax's tracing caches dropped, so that nothing traced under the other form is reused."""
  from jax_sparse_attn import ops
  fwd_module.NAMED_TURN = form
  ops._make_core.cache_clear()
  jax.clear_caches()


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-30))


def _small_checks(rows, fwd_module, forms):
  """Forward of both forms against float32 XLA at small sizes."""
  import jax_sparse_attn as jsa
  from jax_sparse_attn import masks
  ks = jax.random.split(jax.random.PRNGKey(3), 3)
  probs = {
      "dense GQA S=2048": ((1, 2048, 8, 128), (1, 2048, 2, 128),
                           lambda q, k, v, be: jsa.attention(q, k, v, masks.full(), backend=be)),
      "causal window 700 S=2048": ((1, 2048, 4, 128), (1, 2048, 4, 128),
                                   lambda q, k, v, be: jsa.attention(
                                       q, k, v, masks.causal() & masks.sliding_window(700),
                                       backend=be)),
      "LM mask S=2048": ((1, 2048, 4, 128), (1, 2048, 4, 128),
                         lambda q, k, v, be: jsa.attention(
                             q, k, v, masks.causal() & (masks.sliding_window(255)
                                                        | masks.sink(4)), backend=be)),
      "2-D NA 48x48 k13": ((1, 48, 48, 4, 128), (1, 48, 48, 4, 128),
                           lambda q, k, v, be: jsa.na(q, k, v, 13, backend=be)),
      "3-D NA 8x24x24 k(4,7,7)": ((1, 8, 24, 24, 2, 128), (1, 8, 24, 24, 2, 128),
                                  lambda q, k, v, be: jsa.na(q, k, v, (4, 7, 7), backend=be)),
  }
  for name, (sq, skv, fn) in probs.items():
    q = jax.random.normal(ks[0], sq, jnp.bfloat16)
    k, v = (jax.random.normal(x, skv, jnp.bfloat16) for x in ks[1:])
    want = jax.jit(lambda q, k, v: fn(q, k, v, "xla"))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    errs = {}
    for tag in forms:
      _set_form(fwd_module, FORMS[tag])
      got = jax.jit(lambda q, k, v: fn(q, k, v, "mosaic_gpu"))(q, k, v)
      errs[tag] = _rel(got, want)
      errs[tag + "_finite"] = bool(jnp.isfinite(got).all())
    rows.record(check=name, **errs)


def timings(args):
  from benchmarks.bench_gpu import fwd_bwd, inputs
  from jax_sparse_attn.demo import time_ms
  from pallas_kernels.gpu.mosaic_gpu import attention_fwd
  rows = Rows()
  forms = args.forms.split(",")
  if args.small_checks:
    _small_checks(rows, attention_fwd, forms)
  with_bwd = set(args.fwd_bwd.split(","))
  for case in _cases(args.cases.split(",")):
    q, k, v, do = inputs(case.q_shape, case.kv_shape, jnp.bfloat16)
    outs, fns = {}, {}
    for tag in forms:
      _set_form(attention_fwd, FORMS[tag])  # read when the kernel is traced
      fns[tag] = jax.jit(lambda q, k, v, case=case: case.run(q, k, v, "mosaic_gpu"))
      fns[tag] = fns[tag].lower(q, k, v).compile()
      outs[tag] = fns[tag](q, k, v)
      if case.suite in with_bwd:
        fns[tag + "_bwd"] = fwd_bwd(lambda q, k, v, case=case: case.run(
            q, k, v, "mosaic_gpu")).lower(q, k, v, do).compile()
    row = dict(case=case.name)
    for tag in forms[1:]:
      row[f"{tag}_rel_diff"] = _rel(outs[tag], outs[forms[0]])
      row[f"{tag}_finite"] = bool(jnp.isfinite(outs[tag]).all())
    del outs
    for r in range(args.rounds):
      for tag in forms:
        row.setdefault(f"{tag}_fwd_ms", []).append(
            round(time_ms(fns[tag], q, k, v, iters=10, repeats=5, warmup=2), 4))
        if tag + "_bwd" in fns:
          row.setdefault(f"{tag}_fwd_bwd_ms", []).append(
              round(time_ms(fns[tag + "_bwd"], q, k, v, do, iters=5, repeats=5, warmup=1), 4))
    row["pairs"] = case.pairs
    rows.record(**row)
  rows.write(os.path.join(args.out, "timings.json"))


def ptxas_child(form: str, out: str):
  from benchmarks import cli
  from pallas_kernels.gpu.mosaic_gpu import attention_fwd
  attention_fwd.NAMED_TURN = FORMS[form]
  built = cli.suites(quick=False)
  for name in ("dense", "window", "gna2d", "blocksparse"):
    case = [c for c in built[name]() if "4096" not in c.name][0]
    from benchmarks.bench_gpu import inputs
    q, k, v, _ = inputs(case.q_shape, case.kv_shape, jnp.bfloat16)
    print(f"=== case {name}", flush=True)
    jax.jit(lambda q, k, v: case.run(q, k, v, "mosaic_gpu")).lower(q, k, v).compile()
  child_done({"form": form}, os.path.join(out, f"ptxas-{form}.json"))


def main():
  from .diag_fused_registers import ptxas_report
  import argparse
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--cases", default=CASES)
  parser.add_argument("--fwd-bwd", default="dense,window,gna2d")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--forms", default="mbarrier,named")
  parser.add_argument("--small-checks", type=int, default=1)
  parser.add_argument("--ptxas", default="named")
  parser.add_argument("--child", default=None)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.child:
    return ptxas_child(args.child, args.out)
  for form in [f for f in args.ptxas.split(",") if f]:
    log = os.path.join(args.out, f"ptxas-{form}.log")
    env = dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1")
    with open(log, "w") as f:
      try:
        subprocess.run([sys.executable, "-m", "benchmarks.diag.diag_named_turn", "--out",
                        args.out, "--child", form], env=env, stdout=f,
                       stderr=subprocess.STDOUT, timeout=240)
      except subprocess.TimeoutExpired:
        pass
    text = open(log).read()
    report = [r for r in ptxas_report(text) if "spill" in r or "registers" in r]
    print(json.dumps({"ptxas": form, "report": report,
                      "serialized": [l for l in text.splitlines() if "serializ" in l][:6]}),
          flush=True)
  if args.cases:
    timings(args)


if __name__ == "__main__":
  main()
