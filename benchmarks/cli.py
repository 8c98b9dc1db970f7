"""`python -m benchmarks run`: the benchmark suites on whatever device is present.

    python -m benchmarks run --suite gna2d,causal --peers --plot --out bench-out
    python -m benchmarks run --suite all --quick          # CPU smoke run (CI), < 2 minutes
    python -m benchmarks list                             # the suites and their cases

Per case and backend: compile time, peak memory (the compiled program's memory analysis),
forward and forward+backward time (jitted, warm-up, `block_until_ready`, median of repeats),
useful TFLOP/s (../shared/PERF.md: 4·B·H·pairs·D forward, 3.5x that forward+backward),
speedup over our dense kernel on the same shapes beside the block bound (dense blocks /
visited blocks), and the peers where present: cuDNN and XLA through
`jax.nn.dot_product_attention`, tokamax's Mosaic GPU kernels if it imports, and torch FlexAttention in a subprocess if torch imports
(`benchmarks/peers_flex.py`). Writes `results.json` (device, date, versions, git commit, every
row) and `results.md` (a table) under --out, `speedup.png` with --plot (matplotlib: the
`plot` extra).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jax_sparse_attn as jsa
from jax_sparse_attn import masks, routing
from jax_sparse_attn.demo import time_ms
from jax_sparse_attn.layout import SequenceLayout
from jax_sparse_attn.plan import make_plan

from .bench_gpu import document_pairs, documents, fwd_bwd, inputs


@dataclasses.dataclass(frozen=True)
class Case:
  """One problem: `run(q, k, v, backend)` on [batch, *tokens, heads, head_dim] inputs.

  pairs: attended (query, key) pairs per batch element and head (useful FLOPs); bound: dense
  blocks / visited blocks (None: not a block-sparse problem); peer: the mask for the peers
  (("dense"|"causal"|"window", window) or a neighborhood for Flex), None: no peer."""
  suite: str
  name: str
  q_shape: tuple
  kv_shape: tuple
  run: Callable
  pairs: float
  bound: float | None = None
  peer: tuple | None = None
  flex: dict | None = None


def _seq(suite, name, b, s, h, d, mask, peer, hkv=None, flex=None):
  plan = make_plan(mask, SequenceLayout(s, 128), SequenceLayout(s, 128))
  bm = plan.block_map
  dense = bm.num_q_blocks * bm.num_kv_blocks
  pairs = _seq_pairs(mask, s)
  return Case(suite, name, (b, s, h, d), (b, s, hkv or h, d),
              lambda q, k, v, be: jsa.attention(q, k, v, mask, backend=be), pairs,
              dense / bm.num_visited if not isinstance(mask, masks.Full) else None, peer, flex)


def _seq_pairs(mask, s, chunk=4096):
  """Attended pairs of a 1-D mask, counted in row chunks (no S×S array)."""
  total, cols = 0, np.arange(s)
  for r in range(0, s, chunk):
    rows = np.arange(r, min(s, r + chunk))
    total += int(np.sum(np.asarray(mask(rows[:, None], cols[None, :]))))
  return float(total)


def _na(suite, name, b, spatial, h, d, kernel, stride=1, dilation=1, causal=False):
  sim = jsa.simulate(spatial, kernel, stride, dilation, causal)
  run = lambda q, k, v, be: jsa.na(q, k, v, kernel, stride, dilation, causal, backend=be)
  per_dim = lambda x: [int(v) for v in np.broadcast_to(x, len(spatial))]
  flex = dict(spatial=[int(x) for x in spatial], kernel=per_dim(kernel), stride=per_dim(stride))
  bound = sim.window_speedup_bound or sim.block_speedup_bound
  return Case(suite, name, (b, *spatial, h, d), (b, *spatial, h, d), run,
              float(sim.attended_pairs), bound, None, flex)


def _padded(b, spatial, h, d, kernel, pad):
  """A neighborhood whose last `pad` positions of the last dim are padding (`kv_valid`, the
  same for every batch row): pairs counted per dim (stride 1, dilation 1: a window is the
  product of its dims' intervals), the block bound of the unpadded neighborhood."""
  kernel = [int(x) for x in np.broadcast_to(kernel, len(spatial))]
  valid = np.broadcast_to(np.arange(spatial[-1]) < spatial[-1] - pad, (b, *spatial))
  pairs = 1.0
  for i, (n, k) in enumerate(zip(spatial, kernel)):
    x = np.arange(n)
    seen = np.asarray(masks.neighborhood((n,), k)(x[:, None], x[None, :]))
    if i == len(spatial) - 1:
      seen = seen & (x < n - pad)[None, :]
    pairs *= float(seen.sum())
  sim = jsa.simulate(spatial, kernel)
  run = lambda q, k, v, be: jsa.na(q, k, v, kernel, kv_valid=valid, backend=be)
  name = f"{len(spatial)}-D NA {'x'.join(map(str, spatial))} k{tuple(kernel)}, {pad} padded"
  return Case("padded", name + (f", B={b}" if b == 1 else ""), (b, *spatial, h, d),
              (b, *spatial, h, d), run, pairs,
              sim.window_speedup_bound or sim.block_speedup_bound)


def _routing(b, s, h, d, top_k, hkv=None):
  """MoBA: pooled-score top-k + 2 local blocks per query block and head, the selection and
  the runtime map's build inside the timing; ``hkv``: GQA with that many KV heads."""
  bs = 128
  nb = s // bs
  hkv = hkv or h

  def run(q, k, v, be):
    sel = routing.topk_blocks(q, k, bs, top_k, causal=True, local_blocks=2)
    return jsa.attention(q, k, v, masks.causal(), block_selection=sel, backend=be)

  # Blocks a selection visits: top_k + 2 of each row's visible blocks (at most); pairs
  # counted as whole blocks (the diagonal's half is not subtracted).
  visible = np.minimum(np.arange(nb) + 1, top_k + 2)
  pairs = float(np.sum(visible)) * bs * bs
  gqa = f", GQA {h}/{hkv}" if hkv != h else ""
  return Case("routing", f"MoBA causal S={s}, top {top_k} + 2 local of {nb} blocks{gqa}",
              (b, s, h, d), (b, s, hkv, d), run, pairs, nb * nb / float(np.sum(visible)))


def _documents(b, s, h, d, n=4, seed=0):
  """Causal attention over `n` packed documents of random lengths per batch row (segment
  ids): the GPU kernels skip the blocks of different documents (`block_map.from_segments`).
  Pairs and the bound are batch means."""
  from jax_sparse_attn import block_map as block_map_lib
  seg = documents(b, s, n, seed)
  static = make_plan(masks.causal(), SequenceLayout(s, 128), SequenceLayout(s, 128)).block_map
  cls = np.asarray(block_map_lib.segment_classes(seg, seg, static))
  pairs = float(np.mean(document_pairs(seg)))
  bound = static.num_q_blocks * static.num_kv_blocks / ((cls > 0).sum() / b)
  run = lambda q, k, v, be: jsa.attention(q, k, v, masks.causal(), segment_ids=seg, backend=be)
  return Case("documents", f"causal, {n} packed documents, S={s}", (b, s, h, d), (b, s, h, d),
              run, pairs, bound)


def suites(quick: bool, batch: int | None = None, heads: int | None = None,
           head_dim: int | None = None) -> dict[str, Callable[[], list[Case]]]:
  """Suite name -> a function building its cases (full size, or tiny with `quick`). `batch`,
  `heads`, `head_dim` replace the cases' own (``--batch``, ``--heads``, ``--head-dim``): the
  GQA cases (the LM mask's, MoBA's second) keep a quarter of the heads as KV heads where they
  divide by 4, and the names say what was replaced."""
  if quick:
    b, h, d, s = batch or 1, heads or 2, head_dim or 32, 256
    return {name: _renamed(build, batch, heads, head_dim) for name, build in {
        "dense": lambda: [_seq("dense", f"dense S={s}", b, s, h, d, masks.full(), ("dense", 0))],
        "causal": lambda: [_seq("causal", f"causal S={s}", b, s, h, d, masks.causal(),
                                ("causal", 0))],
        "window": lambda: [_seq("window", f"causal window 64, S={s}", b, s, h, d,
                                masks.causal() & masks.sliding_window(63), ("window", 63))],
        "gna1d": lambda: [_na("gna1d", "1-D NA 256 k31", b, (256,), h, d, 31)],
        "gna2d": lambda: [_na("gna2d", "2-D NA 16x16 k5", b, (16, 16), h, d, 5)],
        "gna3d": lambda: [_na("gna3d", "3-D NA 4x8x8 k(2,3,3)", b, (4, 8, 8), h, d, (2, 3, 3))],
        "strided": lambda: [_na("strided", "2-D NA 16x16 k8 stride 4", b, (16, 16), h, d, 8, 4)],
        "blocksparse": lambda: [_seq("blocksparse", f"causal & (window 32 | 4 sinks), S={s}",
                                     b, s, h, d, masks.causal() & (masks.sliding_window(31)
                                                                   | masks.sink(4)), None)],
        "routing": lambda: [_routing(b, 512, h, d, 1)],
        "documents": lambda: [_documents(batch or 2, s, h, d)],
        "padded": lambda: [_padded(b, (16, 16), h, d, 5, 3)],
        "cp": lambda: _cp_cases(b, 512, h, d),
        "models": lambda: [],  # (run_suites: bench_models.cases(quick=True))
    }.items()}
  b, h, d = batch or 2, heads or 16, head_dim or 128
  b1 = batch or 1  # the cases of one batch row
  hkv = h // 4 if h % 4 == 0 else h
  gqa = f"GQA {h}/{hkv}" if hkv != h else "MHA"
  return {name: _renamed(build, batch, heads, head_dim) for name, build in {
      "dense": lambda: [_seq("dense", f"dense S={s}", b, s, h, d, masks.full(), ("dense", 0))
                        for s in (4096, 16384)],
      "causal": lambda: [_seq("causal", f"causal S={s}", b, s, h, d, masks.causal(),
                              ("causal", 0)) for s in (4096, 16384)],
      "window": lambda: [_seq("window", "causal window 2048, S=32768, B=1", b1, 32768, h, d,
                              masks.causal() & masks.sliding_window(2047), ("window", 2047))],
      "gna1d": lambda: [_na("gna1d", "1-D NA 32768 k2049", b, (32768,), h, d, 2049)],
      "gna2d": lambda: [_na("gna2d", "2-D NA 128x128 k33", b, (128, 128), h, d, 33)],
      "gna3d": lambda: [_na("gna3d", "3-D NA 16x64x64 k(8,16,16), B=1", b1, (16, 64, 64), h,
                            d, (8, 16, 16))],
      "strided": lambda: [_na("strided", "3-D NA 16x64x64 k(8,16,16) stride (4,8,8), B=1", b1,
                              (16, 64, 64), h, d, (8, 16, 16), (4, 8, 8))],
      "blocksparse": lambda: [_seq("blocksparse", "causal & (window 512 | 4 sinks), S=8192, "
                                   + gqa, b, 8192, h, d,
                                   masks.causal() & (masks.sliding_window(511) | masks.sink(4)),
                                   None, hkv=hkv, flex=dict(kind="window_sink", window=511,
                                                            sinks=4))],
      "routing": lambda: [_routing(b1, 32768, h, d, 32)] + (
          [_routing(b1, 32768, h, d, 32, hkv)] if hkv != h else []),
      "documents": lambda: [_documents(b, 16384, h, d)],
      "padded": lambda: [_padded(b, (128, 128), h, d, 33, 24),
                         _padded(b, (96, 96), h, d, 17, 16),
                         _padded(b1, (16, 64, 64), h, d, (8, 16, 16), 8)],
      "cp": lambda: _cp_cases(b1, 65536, h, d),
      "models": lambda: [],
  }.items()}


def _renamed(build, batch, heads, head_dim):
  """`build` whose cases' names say the batch, heads and head_dim given in their place (a
  batch given replaces the names' own ", B=1")."""
  given = [f"{k}={v}" for k, v in (("B", batch), ("H", heads), ("D", head_dim)) if v]
  if not given:
    return build
  suffix = f" [{', '.join(given)}]"
  strip = (lambda n: n.replace(", B=1", "")) if batch else (lambda n: n)
  return lambda: [dataclasses.replace(c, name=strip(c.name) + suffix) for c in build()]


def _cp_cases(b, s, h, d):
  """Context parallelism over every device present (a `context` mesh axis)."""
  n = jax.device_count()
  if n < 2:
    return []
  mesh = jax.make_mesh((n,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
  run = lambda q, k, v, be: jsa.attention(q, k, v, masks.causal(), backend=be, mesh=mesh,
                                          context_axis="context")
  return [Case("cp", f"causal S={s} over {n} devices (ring)", (b, s, h, d), (b, s, h, d), run,
               s * (s + 1) / 2)]


SUITES = ("dense", "causal", "window", "gna1d", "gna2d", "gna3d", "strided", "blocksparse",
          "routing", "documents", "padded", "cp", "models")
NOT_HERE = {"cp": "needs 2 or more devices (jax.device_count() is 1)",
            "models": "training-step time of the models/ (ours vs dense attention)"}


# --------------------------------------------------------------------------------------------


def _compiled(fn, *args):
  """(compiled executable, compile seconds, peak bytes or None)."""
  t = time.perf_counter()
  compiled = fn.lower(*args).compile()
  seconds = time.perf_counter() - t
  peak = None
  try:
    ma = compiled.memory_analysis()
    if ma is not None:
      peak = int(ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes)
  except Exception:  # noqa: BLE001 - not every platform reports it
    pass
  return compiled, seconds, peak


def measure(fn, args, iters, repeats):
  """Forward and forward+backward: compile s, peak bytes, ms."""
  q, k, v, do = args
  out = {}
  for tag, f, a in (("fwd", jax.jit(fn), (q, k, v)), ("fwd_bwd", fwd_bwd(fn), (q, k, v, do))):
    compiled, secs, peak = _compiled(f, *a)
    out[f"{tag}_compile_s"] = round(secs, 2)
    out[f"{tag}_peak_mb"] = None if peak is None else round(peak / 2**20, 1)
    out[f"{tag}_ms"] = round(time_ms(compiled, *a, iters=iters, repeats=repeats, warmup=2), 4)
  return out


def _round(x: float, decimals: int) -> float:
  """`round(x, decimals)`, or two significant digits where that would keep fewer (a slow
  CPU row of the quick run never reads 0.0)."""
  return round(x, decimals) if x == 0 or abs(x) >= 10 ** (1 - decimals) else float(f"{x:.2g}")


def _tflops(case: Case, row: dict) -> dict:
  """Useful TFLOP/s of a row's times: 4·B·H·pairs·D forward, 3.5x that forward+backward."""
  b, h, d = case.q_shape[0], case.q_shape[-2], case.q_shape[-1]
  flops = 4.0 * b * h * case.pairs * d
  return dict(fwd_tflops=_round(flops / row["fwd_ms"] / 1e9, 4),
              fwd_bwd_tflops=_round(3.5 * flops / row["fwd_bwd_ms"] / 1e9, 4))


def _peer_fns(case: Case, platform: str):
  """jax.nn.dot_product_attention peers of a 1-D case: cuDNN (GPU) and XLA."""
  if case.peer is None or len(case.q_shape) != 4:
    return []
  kind, window = case.peer
  kw = dict(is_causal=kind != "dense")
  if kind == "window":
    kw["local_window_size"] = (window, 0)
  # On GPUs cuDNN only: XLA's implementation materializes the S×S scores (tens of GB here).
  impls = ["cudnn"] if platform == "gpu" else ["xla"]
  fns = [(f"peer: {impl} (jax.nn.dot_product_attention)",
          lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, implementation=impl,
                                                                  **kw)) for impl in impls]
  if platform == "gpu":
    try:  # tokamax's Mosaic GPU kernels, where the package is installed
      import tokamax
      fns.append(("peer: tokamax mosaic", lambda q, k, v: tokamax.dot_product_attention(
          q, k, v, implementation="mosaic", **kw)))
    except ImportError:
      pass
  return fns


def _flex_spec(case: Case, dtype: str):
  """The problem as `benchmarks.peers_flex` reads it (None: no Flex peer for this case)."""
  if case.flex is None and case.peer is None:
    return None
  return dict(name=case.name, q_shape=case.q_shape, kv_shape=case.kv_shape, dtype=dtype,
              mask=case.flex if case.flex is not None else dict(kind=case.peer[0],
                                                                window=case.peer[1]))


def _flex(specs, log):
  """torch FlexAttention on each problem, all in one subprocess (torch imported once); rows
  by case name, or {} when torch is absent."""
  if not specs:
    return {}
  try:
    res = subprocess.run([sys.executable, "-m", "benchmarks.peers_flex", json.dumps(specs)],
                         capture_output=True, text=True, timeout=1800)
  except (OSError, subprocess.TimeoutExpired) as e:
    log(f"torch Flex: {e!r}")
    return {}
  out = {}
  for line in res.stdout.splitlines():
    if line.startswith("{"):
      row = json.loads(line)
      out[row.pop("name", None)] = row
  if not out:
    log(f"torch Flex: no output ({(res.stderr or '')[-300:]})")
  return out


def _git_commit():
  """`JSA_COMMIT` if set (a copy of a checkout whose git directory lags its files), else git's
  short HEAD, "+modified" where tracked files differ from it."""
  if os.environ.get("JSA_COMMIT"):
    return os.environ["JSA_COMMIT"]
  git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,
                                  cwd=os.path.dirname(__file__)).stdout.strip()
  try:
    head = git("rev-parse", "--short", "HEAD")
    if head and git("status", "--porcelain", "--untracked-files=no"):
      head += "+modified"
    return head or None
  except OSError:
    return None


def run_suites(names, *, quick, backends, peers, iters, repeats, dtype, log=print,
               save=lambda rows: None, shapes=None):
  """The rows of every case of the named suites (`save(rows)` after each, so that a run cut
  short keeps what it measured); `shapes`: `suites`' batch, heads and head_dim."""
  table = suites(quick, **(shapes or {}))
  platform = jax.default_backend()
  rows, cases = [], []
  for name in names:
    if name == "models":
      rows += _models(quick, backends, peers, log)
      continue
    built = table[name]()
    if not built:
      rows.append(dict(suite=name, skipped=NOT_HERE.get(name, "no cases on this device")))
      log(f"[{name}] skipped: {rows[-1]['skipped']}")
    cases += built
  dense_ms: dict = {}
  for i, case in enumerate(cases, 1):
    args = inputs(case.q_shape, case.kv_shape, dtype)
    runs = [(f"ours: {be}", lambda q, k, v, be=be: case.run(q, k, v, be)) for be in backends]
    if peers:
      runs += _peer_fns(case, platform)
    # Our dense kernel on the same shapes: the speedup's denominator (1-D and N-D alike).
    key = (case.q_shape, case.kv_shape)
    if case.bound is not None and key not in dense_ms:
      dense = lambda q, k, v: jsa.attention(q.reshape(q.shape[0], -1, *q.shape[-2:]),
                                            k.reshape(k.shape[0], -1, *k.shape[-2:]),
                                            v.reshape(v.shape[0], -1, *v.shape[-2:]),
                                            backend=backends[0]).reshape(q.shape)
      try:
        dense_ms[key] = (time_ms(jax.jit(dense), *args[:3], iters=iters, repeats=repeats),
                         time_ms(fwd_bwd(dense), *args, iters=iters, repeats=repeats))
      except Exception:  # noqa: BLE001
        traceback.print_exc()
        dense_ms[key] = None
    for impl, fn in runs:
      t0 = time.perf_counter()
      row = dict(suite=case.suite, case=case.name, impl=impl, bound=case.bound)
      try:
        row.update(measure(fn, args, iters, repeats))
        row.update(_tflops(case, row))
        if case.bound is not None and dense_ms.get(key) and impl.startswith("ours"):
          row.update(speedups(*dense_ms[key], row["fwd_ms"], row["fwd_bwd_ms"], case.bound))
      except Exception as e:  # noqa: BLE001 - one failure must not hide the others
        row["error"] = repr(e)[:300]
        traceback.print_exc()
      rows.append(row)
      save(rows)
      log(f"[{i}/{len(cases)}] {case.suite}: {case.name} | {impl} | "
          + (f"fwd {row['fwd_ms']:.3f} ms, fwd+bwd {row['fwd_bwd_ms']:.3f} ms"
             if "fwd_ms" in row else f"error {row.get('error')}")
          + f" ({time.perf_counter() - t0:.1f} s)")
  if peers and platform == "gpu":
    specs = [x for x in (_flex_spec(c, str(jnp.dtype(dtype))) for c in cases) if x]
    log(f"torch Flex on {len(specs)} cases (one subprocess) ...")
    flex = _flex(specs, log)
    for case in cases:
      if case.name in flex:
        row = dict(suite=case.suite, case=case.name, impl="peer: torch Flex", bound=case.bound,
                   **flex[case.name])
        if "fwd_ms" in row:
          row.update(_tflops(case, row))
        rows.append(row)
        log(f"{case.suite}: {case.name} | torch Flex | {flex[case.name]}")
  return rows


def speedups(dense_fwd: float, dense_fwd_bwd: float, fwd: float, fwd_bwd: float,
             bound: float) -> dict:
  """Speedups over our dense kernel on the same shapes: forward, forward+backward, and the
  backward alone (fwd+bwd less fwd, where both differences are positive) with its share of
  the block bound (issue #21's measure for the neighborhood rows)."""
  out = {"speedup_fwd": _round(dense_fwd / fwd, 2),
         "speedup_fwd_bwd": _round(dense_fwd_bwd / fwd_bwd, 2)}
  if fwd_bwd > fwd and dense_fwd_bwd > dense_fwd:
    bwd = (dense_fwd_bwd - dense_fwd) / (fwd_bwd - fwd)
    out.update(speedup_bwd=_round(bwd, 2), bwd_share_of_bound=round(bwd / bound, 3))
  return out


def _models(quick, backends, peers, log):
  """Training-step ms of the models/ with our attention (and dense attention as the peer)."""
  from benchmarks import bench_models
  rows = []
  # (quick: no dense-attention peer, a CPU smoke run compares nothing)
  for be in backends + (["dense"] if peers and not quick else []):
    for name, make, loss_fn, batch in bench_models.cases(be, quick=quick):
      row = dict(suite="models", case=name, impl=("peer: dense attention" if be == "dense"
                                                  else f"ours: {be}"))
      try:
        row["step_ms"] = round(bench_models.step_time(make(), loss_fn, batch,
                                                      iters=2 if quick else 10), 3)
      except Exception as e:  # noqa: BLE001
        row["error"] = repr(e)[:300]
      rows.append(row)
      log(f"[models] {name} | {row['impl']} | step {row.get('step_ms', row.get('error'))} ms")
  return rows


def markdown(rows) -> str:
  cell = lambda text: str(text).replace("|", "\\|")
  out = ["| suite | case | implementation | fwd ms | fwd+bwd ms | fwd TFLOP/s | speedup fwd / "
         "fwd+bwd / bwd (bound) | compile s | peak MB |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "skipped" in r:
      out.append(f"| {r['suite']} | skipped: {r['skipped']} | | | | | | | |")
      continue
    if "step_ms" in r:
      out.append(f"| {r['suite']} | {cell(r['case'])} | {r['impl']} | training step {r['step_ms']:.2f} ms"
                 " | | | | | |")
      continue
    f = lambda key, fmt="{:.3f}": fmt.format(r[key]) if r.get(key) is not None else "—"
    speed = (f"{r['speedup_fwd']} / {r['speedup_fwd_bwd']} / {r.get('speedup_bwd', '—')}"
             if "speedup_fwd" in r else "—")
    bound = f" ({r['bound']:.2f})" if r.get("bound") else ""
    out.append(f"| {r['suite']} | {cell(r['case'])} | {r['impl']} | {f('fwd_ms')} | {f('fwd_bwd_ms')} | "
               f"{f('fwd_tflops', '{:.3g}')} | {speed}{bound} | {f('fwd_compile_s', '{:.1f}')} | "
               f"{f('fwd_bwd_peak_mb', '{:.0f}')} |" if "error" not in r else
               f"| {r['suite']} | {cell(r['case'])} | {r['impl']} | error: {cell(r['error'][:80])} | | | | | |")
  return "\n".join(out)


def plot(rows, path, title=None):
  """speedup.png of `rows`; ``title`` defaults to this machine's device (pass the results'
  device when plotting a results.json elsewhere)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  pts = [r for r in rows if r.get("speedup_fwd_bwd") and r.get("bound")]
  fig, ax = plt.subplots(figsize=(6, 5))
  for r in pts:
    ax.scatter(r["bound"], r["speedup_fwd"], marker="o", color="C0")
    ax.scatter(r["bound"], r["speedup_fwd_bwd"], marker="s", color="C1")
    ax.annotate(r["case"][:28], (r["bound"], r["speedup_fwd"]), fontsize=6)
  top = max([1.0] + [r["bound"] for r in pts]) * 1.1
  ax.plot([1, top], [1, top], "k--", lw=0.8, label="bound")
  ax.set(xscale="log", yscale="log", xlabel="block bound (dense / visited blocks)",
         ylabel="speedup over our dense kernel", title=title or jax.devices()[0].device_kind)
  ax.scatter([], [], marker="o", color="C0", label="forward")
  ax.scatter([], [], marker="s", color="C1", label="forward+backward")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=150)


def _positive(text: str) -> int:
  """An argparse type: a positive int."""
  value = int(text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
  return value


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  run = sub.add_parser("run", help="run suites")
  run.add_argument("--suite", default="all", help=f"comma-separated: {', '.join(SUITES)}, all")
  run.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
  run.add_argument("--backends", default="auto", help="comma-separated, e.g. auto,triton,xla")
  run.add_argument("--peers", action="store_true", help="cuDNN/XLA (jax) and torch Flex")
  run.add_argument("--plot", action="store_true", help="speedup.png (needs matplotlib)")
  run.add_argument("--out", default="bench-out")
  run.add_argument("--iters", type=int, default=None)
  run.add_argument("--repeats", type=int, default=None)
  run.add_argument("--dtype", default=None, help="default: bfloat16 on GPU/TPU, float32 on CPU")
  for flag, what in (("--batch", "batch"), ("--heads", "query heads"),
                     ("--head-dim", "head_dim")):
    run.add_argument(flag, type=_positive, default=None,
                     help=f"every case's {what} (default: each case's own)")
  sub.add_parser("list", help="list the suites and their cases")
  args = parser.parse_args(argv)
  if args.command == "list":
    for quick in (False, True):
      print("quick sizes:" if quick else "full sizes:")
      for name, build in suites(quick).items():
        names = [c.name for c in build()] or [NOT_HERE.get(name, "none on this device")]
        print(f"  {name:<12} " + "; ".join(names))
    return 0
  names = list(SUITES) if args.suite == "all" else args.suite.split(",")
  bad = [n for n in names if n not in SUITES]
  if bad:
    parser.error(f"unknown suite(s) {bad}; choose from {', '.join(SUITES)}")
  shapes = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim)
  platform = jax.default_backend()
  dtype = jnp.dtype(args.dtype or ("float32" if platform == "cpu" else "bfloat16"))
  iters = args.iters or (1 if args.quick else 10)
  repeats = args.repeats or (1 if args.quick else 5)
  backends = args.backends.split(",")
  os.makedirs(args.out, exist_ok=True)
  dev = jax.devices()[0]
  import flax
  import jaxlib
  head = dict(device=dev.device_kind, platform=platform, devices=jax.device_count(),
              jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__,
              python=sys.version.split()[0], date=datetime.date.today().isoformat(),
              dtype=str(dtype),
              commit=_git_commit(), quick=args.quick, backends=backends, suites=names,
              **{k: v for k, v in shapes.items() if v})
  print(json.dumps(head), flush=True)
  t = time.perf_counter()

  def save(rows):
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump(dict(head, seconds=round(time.perf_counter() - t, 1), rows=rows), f, indent=1)

  rows = run_suites(names, quick=args.quick, backends=backends, peers=args.peers, iters=iters,
                    repeats=repeats, dtype=dtype, save=save, shapes=shapes)
  save(rows)
  table = markdown(rows)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(f"{head['device']}, {head['date']}, jax {head['jax']}, {head['dtype']}, commit "
            f"{head['commit']}\n\n{table}\n")
  print(table)
  if args.plot:
    try:
      plot(rows, os.path.join(args.out, "speedup.png"))
    except ImportError as e:
      print(f"--plot needs matplotlib (pip install -e '.[plot]'): {e}")
  errors = [r for r in rows if "error" in r and not r["impl"].startswith("peer")]
  return 1 if errors else 0
