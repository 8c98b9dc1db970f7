"""Lab tools: one question each, run on the device machine (`run_device.sh`)."""
import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp


class Rows:
  """The rows of a diagnostic: `record(**row)` keeps the row and prints it as a JSON line
  (printed lines survive a call that runs past its time limit); `write(path)` saves them with
  the device."""

  def __init__(self):
    self.rows = []

  def record(self, **row):
    self.rows.append(row)
    print(json.dumps(row), flush=True)

  def write(self, path):
    if path:
      with open(path, "w") as f:
        json.dump({"device": str(jax.devices()[0]), "date": time.strftime("%Y-%m-%d"),
                   "rows": self.rows}, f, indent=1)


def case_parser(cases: str) -> argparse.ArgumentParser:
  """A diagnostic's command line: ``--cases`` (comma-separated, default `cases`) and
  ``--out`` (a JSON path); callers add their own arguments."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--cases", default=cases)
  parser.add_argument("--out", default=None)
  return parser


def variant_parser(variants) -> argparse.ArgumentParser:
  """The command line of a diagnostic that runs each variant in a child process of its own
  (ptxas' report and the compile cache per variant): ``--out`` (required), ``--variants``
  (comma-separated, default: all of `variants`) and ``--child`` (the variant a child runs);
  callers add their own arguments."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--variants", default=",".join(variants))
  parser.add_argument("--child", default=None)
  return parser


def child_done(row: dict, path: str):
  """A variant's child process ends: `row` printed and written to `path` as JSON, then the
  process exits at once (no teardown of the GPU runtime to wait for or fail in)."""
  json.dump(row, open(path, "w"))
  print(json.dumps(row), flush=True)
  sys.stdout.flush()
  os._exit(0)


def ptxas_report(text: str):
  """(registers, spill store bytes, spill load bytes) per kernel in ptxas' report
  (`MOSAIC_GPU_DUMP_PTXAS=1`)."""
  rows, name = [], None
  for line in text.splitlines():
    m = re.search(r"Compiling entry function '([^']+)'", line)
    if m:
      name = m.group(1)
    m = re.search(r"Used (\d+) registers", line)
    if m and name:
      rows.append({"kernel": name, "registers": int(m.group(1))})
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
      rows.append({"kernel": name, "spill_stores": int(m.group(1)),
                   "spill_loads": int(m.group(2))})
  return rows


def run_variant(module: str, name: str, out: str, args=(), env=None, timeout: float = 400):
  """Variant `name` of the diagnostic `module` in a child process of its own (`variant_parser`:
  ``--out out --child name``, then `args`), with ptxas' report on; its output goes to
  ``out/name.log``. Returns the row the child wrote (`child_done` to ``out/name.json``), else
  the last JSON line it printed before a timeout, else its return code and the output's tail;
  with ``ptxas`` (`ptxas_report`) added."""
  env = dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1", **(env or {}))
  log = os.path.join(out, f"{name}.log")
  with open(log, "w") as f:
    try:
      rc = subprocess.run([sys.executable, "-m", module, "--out", out, "--child", name, *args],
                          env=env, stdout=f, stderr=subprocess.STDOUT,
                          timeout=timeout).returncode
    except subprocess.TimeoutExpired:
      rc = "timeout"
  text = open(log).read()
  path = os.path.join(out, f"{name}.json")
  lines = [l for l in text.splitlines() if l.startswith("{")]
  if os.path.exists(path):
    row = json.load(open(path))
  elif rc == "timeout" and lines:
    row = dict(json.loads(lines[-1]), rc=rc)
  else:
    row = {"variant": name, "rc": rc, "tail": text[-1500:]}
  row["ptxas"] = ptxas_report(text)
  return row


def max_rel_diff(grads, ref) -> float:
  """The largest relative L2 difference (float32) between matching arrays of two tuples."""
  return max(float(jnp.linalg.norm(g.astype(jnp.float32) - r.astype(jnp.float32))
                   / jnp.linalg.norm(r.astype(jnp.float32))) for g, r in zip(grads, ref))


@contextlib.contextmanager
def hopper_backward_forced(on: bool = True):
  """Inside, `auto`'s backward choice (`config.hopper_backward_neighborhood`, and its import
  in `policy`) takes the Hopper kernels for every neighborhood (``on``; else leaves
  it); restored on the way out. Callers clear `ops._make_core`'s cache around it."""
  from pallas_kernels.gpu.mosaic_gpu import config, policy
  saved = config.hopper_backward_neighborhood, policy.hopper_backward_neighborhood
  try:
    if on:
      config.hopper_backward_neighborhood = lambda *args, **kw: True
      policy.hopper_backward_neighborhood = lambda *args, **kw: True
    yield
  finally:
    config.hopper_backward_neighborhood, policy.hopper_backward_neighborhood = saved


def backward_inputs(plan, batch: int, n: int, heads: int, kv_heads: int, head_dim: int, cfg,
                    seed: int = 0):
  """Random bf16 q, k, v, dO [batch, n, heads | kv_heads, head_dim] (in the plan's token
  order) and the Hopper forward's out and lse on `plan`: the inputs of
  `attention_bwd.backward`."""
  from pallas_kernels.gpu.mosaic_gpu import attention_fwd  # the lab's only GPU-kernel import
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, do = (jax.random.normal(x, (batch, n, heads, head_dim), jnp.bfloat16) for x in ks[:2])
  k, v = (jax.random.normal(x, (batch, n, kv_heads, head_dim), jnp.bfloat16) for x in ks[2:])
  scale = 1 / math.sqrt(head_dim)
  out, lse = jax.jit(lambda q, k, v: attention_fwd.forward(
      q, k, v, None, None, plan, scale, cfg, False))(q, k, v)
  return q, k, v, do, out, lse


_ALL_WIDTHS = []  # `config.WIDTHS` as first seen
_NEW_WIDTHS = (32, 48, 80, 96, 160, 192)  # widths added after 64, 128 and 256


def native_widths(on: bool, head_dim: int | None = None):
  """The Hopper kernels' head_dim widths (`mosaic_gpu.config.WIDTHS`): all, or ``on=False``
  to run `head_dim` as before its own width existed (32 and 48 at 64, 80 and 96 at 96 or 128,
  160 at 192, 192 at 256)."""
  from pallas_kernels.gpu.mosaic_gpu import config
  if not _ALL_WIDTHS:
    _ALL_WIDTHS.extend(config.WIDTHS)
  config.WIDTHS = tuple(_ALL_WIDTHS)
  own = config._padded_head_dim(head_dim) if not on else None
  if own in _NEW_WIDTHS:
    config.WIDTHS = tuple(w for w in _ALL_WIDTHS if w != own)


def interleaved(row: dict, variants: dict, big, rounds: int = 2, iters: int = 10,
                repeats: int = 5) -> dict:
  """Into `row`: each variant's forward and fwd+bwd ms at `big` (q, k, v, dO), the variants
  interleaved over `rounds` (``{name}_fwd_ms_{round}``, ``{name}_fwd_bwd_ms_{round}``).
  `variants` maps a name to a function that sets the variant's knobs and returns its fn(q, k,
  v). Each timing calls it again and jits what it returns (compiled in `time_ms`'s warm-up
  call, not timed): a knob setter that clears jax's caches (`knob_setter`) makes every
  jitted function retrace under the knobs set last, so a step jitted under an earlier
  variant's knobs would run the last one's kernels (every knob diagnostic before 2026-12-05
  timed its last variant under each name). Returns each variant's output and gradients at
  `big`, computed right after its knobs were set. A variant that does not compile (shared
  memory, registers) is a result: ``{name}_error``, and it is left out of the timings."""
  from jax_sparse_attn.demo import time_ms
  from ..bench_gpu import fwd_bwd
  grads = {}
  for name, make in variants.items():
    try:
      grads[name] = jax.block_until_ready(fwd_bwd(make())(*big))
    except Exception as e:  # noqa: BLE001
      row[f"{name}_error"] = repr(e)[-300:]
  for rnd in range(rounds):
    for name, make in variants.items():
      if name not in grads:
        continue
      fn = make()  # its knobs hold for both timings
      row[f"{name}_fwd_ms_{rnd}"] = round(time_ms(jax.jit(fn), *big[:3], iters=iters,
                                                  repeats=repeats), 4)
      row[f"{name}_fwd_bwd_ms_{rnd}"] = round(time_ms(fwd_bwd(fn), *big, iters=iters,
                                                      repeats=repeats), 4)
  return grads


def interleaved_vs_first(row: dict, variants: dict, big, rounds: int = 2) -> dict:
  """`interleaved`, then into `row` every later variant's gradients against the first's
  (``{name}_rel_diff``, `max_rel_diff`). Returns the gradients."""
  grads = interleaved(row, variants, big, rounds=rounds)
  first, *others = grads
  for name in others:
    row[f"{name}_rel_diff"] = max_rel_diff(grads[name], grads[first])
  return grads


def check_and_time(row: dict, fn, small, ref, big, iters: int = 10, repeats: int = 5):
  """Into `row`: fn(q, k, v)'s output and gradients at the inputs `small` (q, k, v, dO)
  against `ref` (relative L2, float32), and its forward and fwd+bwd ms at `big`."""
  from jax_sparse_attn.demo import time_ms
  from ..bench_gpu import fwd_bwd, rel_errors
  got = fwd_bwd(fn)(*small)
  row["rel_err_vs_xla_f32"] = rel_errors(got, ref, digits=5)
  row["fwd_ms"] = round(time_ms(jax.jit(fn), *big[:3], iters=iters, repeats=repeats), 3)
  row["fwd_bwd_ms"] = round(time_ms(fwd_bwd(fn), *big, iters=iters, repeats=repeats), 3)


def knob_rows(cases: dict, names: str, variants: dict, set_variant, run, rows: Rows,
              out: str | None):
  """Per case of `cases` (name: (mask, batch, seq, heads, kv heads, head_dim, documents)):
  the first variant's output and gradients at a smaller size against float32 XLA, then every
  variant's fwd and fwd+bwd ms at full size (`interleaved`, each traced under
  ``set_variant(value)``) and each later variant's gradients against the first's.
  `variants` maps a name to its value; ``run(mask, segment_ids)`` is fn(q, k, v)."""
  from jax_sparse_attn import ops
  from ..bench_gpu import documents, fwd_bwd, inputs, rel_errors
  first, *others = variants
  for name in names.split(","):
    mask, b, s, h, hkv, d, docs = cases[name]
    row = {"case": name, "batch": b, "seq": s, "heads": f"{h}/{hkv}", "head_dim": d,
           "documents": docs}
    sb, ss = 1, min(s, 4096)
    small = inputs((sb, ss, 4, d), (sb, ss, 4 * hkv // h, d), jnp.bfloat16, seed=1)
    seg_s = documents(sb, ss, docs) if docs else None
    f32 = [x.astype(jnp.float32) for x in small]
    want = fwd_bwd(lambda q, k, v: ops.attention(q, k, v, mask, segment_ids=seg_s,
                                                 backend="xla"))(*f32)
    set_variant(variants[first])
    got = fwd_bwd(run(mask, seg_s))(*small)
    row["rel_err_vs_xla_f32"] = rel_errors(got, want, digits=5)
    big = inputs((b, s, h, d), (b, s, hkv, d), jnp.bfloat16)
    seg = documents(b, s, docs) if docs else None

    def variant(value):  # traced and compiled under each setting, then timed
      set_variant(value)
      return run(mask, seg)

    grads = interleaved(row, {n: (lambda v=v: variant(v)) for n, v in variants.items()}, big)
    for other in others:
      row[f"{first}_vs_{other}_rel_diff"] = max_rel_diff(grads[first], grads[other])
    set_variant(variants[first])
    rows.record(**row)
    rows.write(out)


def knob_setter(module, attr: str):
  """A `knob_rows` ``set_variant``: sets ``module.attr`` and clears the caches of traced
  kernels (`ops._make_core`'s and jax's), so that the next call traces under it."""
  def set_variant(value):
    from jax_sparse_attn import ops
    setattr(module, attr, value)
    ops._make_core.cache_clear()
    jax.clear_caches()
  return set_variant


def knob_main(cases: dict, variants: dict, set_variant, run):
  """A `knob_rows` diagnostic's command line: ``--cases`` (default: all) and ``--out``."""
  args = case_parser(",".join(cases)).parse_args()
  knob_rows(cases, args.cases, variants, set_variant, run, Rows(), args.out)
