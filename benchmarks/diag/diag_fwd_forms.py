"""Forms of the Hopper forward set by a module switch of `attention_fwd`, A/B at the
headline's sizes: forward ms (fwd+bwd on a few rows), every form alternating in one process,
the outputs compared with the first form's and with float32 XLA at small sizes.

  LAZY_RESCALE: FlashAttention-4's conditional rescale (a row's running max kept until it
    grows by more than the value, in log2 units; the output's rescale skipped by a
    per-thread branch) against the running max every step ("none"); "8/plain" keeps the max
    but multiplies every step (`LAZY_BRANCH` off).

Two switches of the thirty-seventh session (NAMED_TURN, EXP2_POLY) were measured with it and
removed (docs/performance.md); a new switch is one entry of SWITCHES.

    python -m benchmarks.diag.diag_fwd_forms --out DIR --switch LAZY_RESCALE \
        --forms every=none,lazy8=8 [--cases dense,causal,...]
"""
import argparse
import os

import jax
import jax.numpy as jnp

from benchmarks.bench_gpu import rel as _rel

from . import Rows

CASES = "dense,causal,window,gna1d,gna2d,gna3d,strided,blocksparse,d64"
# --switch: (default forms, how a form's value parses)
SWITCHES = {"LAZY_RESCALE": ("every=none,lazy8=8,plain8=8/plain",
                             lambda v: None if v == "none" else float(v.split("/")[0]))}
# Switches a form sets beside its own: (switch, form value) -> {other switch: value}.
ALSO = {"LAZY_RESCALE": lambda v: {"LAZY_BRANCH": not v.endswith("/plain")}}
FORMS = {}  # tag: (the switch's value, the form as written) (`main`)
SWITCH = ["LAZY_RESCALE"]


def _cases(names):
  from benchmarks import cli
  built = cli.suites(quick=False)
  out = []
  for name in names:
    if name in ("d64", "c64"):  # head_dim 64: dense / causal S=16384 at B=2, H=16
      suite = "dense" if name == "d64" else "causal"
      out += [c for c in cli.suites(quick=False, head_dim=64)[suite]() if "16384" in c.name]
    else:
      out += [c for c in built[name]() if "4096" not in c.name]
  return out


def _set_form(fwd_module, form):
  """The switch's value for the kernels traced next: the op's cached custom_vjp and jax's
  tracing caches dropped, so that nothing traced under another form is reused."""
  from jax_sparse_attn import ops
  value, raw = form
  setattr(fwd_module, SWITCH[0], value)
  for name, other in ALSO.get(SWITCH[0], lambda v: {})(raw).items():
    setattr(fwd_module, name, other)
  ops._make_core.cache_clear()
  jax.clear_caches()


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
  rows.record(switch=SWITCH[0], forms=dict(FORMS))
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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--cases", default=CASES)
  parser.add_argument("--fwd-bwd", default="dense,window,gna2d")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--switch", default="LAZY_RESCALE", choices=sorted(SWITCHES))
  parser.add_argument("--forms", default=None, help="tag=value,... (the first: the baseline)")
  parser.add_argument("--small-checks", type=int, default=1)
  args = parser.parse_args()
  default, parse = SWITCHES[args.switch]
  SWITCH[0] = args.switch
  pairs = [f.split("=") for f in (args.forms or default).split(",")]
  FORMS.update({tag: (parse(value), value) for tag, value in pairs})
  args.forms = ",".join(tag for tag, _ in pairs)
  os.makedirs(args.out, exist_ok=True)
  timings(args)


if __name__ == "__main__":
  main()
