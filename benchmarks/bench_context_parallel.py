"""Context parallelism on the devices present: correctness at real sizes, 1 vs N devices,
and the measured pieces of the scaling model (docs/performance.md "Context parallelism").

    python -m benchmarks.bench_context_parallel --out results.json    # every GPU present
    python -m benchmarks.bench_context_parallel --small                # CPU smoke test

Sections (each recorded as it finishes; a failing one is recorded and the rest still run):
  link      device-to-device bytes/s of a ppermute and an all_gather (>= 2 devices)
  check     ring (contiguous, zigzag), halo (causal window, 3-D NA, 3-D NA with a padding
            mask), MoBA (all-gather) on N devices vs one device: relative error of out, dq,
            dk, dv
  emulate   the same on ONE device: each shard's local kernels, K/V parts and LSE merges run
            one after the other (every kernel a device runs, without the collectives)
  size_one  a context axis of size 1 against no mesh
  scaling   causal S=262144, MoBA (top 32 of 128-token blocks) at S=131072 and 3-D NA
            16x128x128 k8x16x16 on 1 and N devices, forward and forward+backward, with cuDNN
            (one device) beside them
  pieces    every local kernel a device runs for N = 2, 4, 8 (causal zigzag ring, 3-D NA halo
            weak scaling), timed on one device, and the model's predicted step times
"""
from __future__ import annotations

import argparse
import math
import os
import traceback

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_sparse_attn as jsa
from jax_sparse_attn import context_parallel as cp
from jax_sparse_attn import masks, ops, routing
from benchmarks.bench_gpu import (RESULTS, fwd_bwd, header, inputs, record, rel, timeit,
                                  write_results)

D = 128
# The 3-D NA problem: kernel and the frame size (--small shrinks both for CPU).
NA = dict(kernel=(8, 16, 16), frame=(128, 128))
CASES = [""]  # --cases: run only the emulate/pieces cases whose names contain one of these


def _mesh(n):
  return jax.make_mesh((n,), ("context",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def _place(mesh, x):
  return jax.device_put(x, NamedSharding(mesh, P(None, "context")))


def _time(fn, *args, reps=3):
  return timeit(fn, *args, iters=1, warmup=1, repeats=reps)


def link(n, mb):
  """One-direction device-to-device rate of a ring ppermute, and of a tiled all_gather."""
  mesh = _mesh(n)
  rows = mb * 2**20 // (2 * 1024)
  x = _place(mesh, jnp.ones((1, rows * n, 1024), jnp.bfloat16))
  perm = [(j, (j + 1) % n) for j in range(n)]
  send = jax.jit(jax.shard_map(lambda a: jax.lax.ppermute(a, "context", perm), mesh=mesh,
                               in_specs=P(None, "context"), out_specs=P(None, "context")))
  gather = jax.jit(jax.shard_map(
      lambda a: jax.lax.all_gather(a, "context", axis=1, tiled=True), mesh=mesh,
      in_specs=P(None, "context"), out_specs=P(None, None), check_vma=False))
  shard_bytes = rows * 1024 * 2
  ms = timeit(send, x, iters=10, warmup=2, repeats=5)
  record(section="link", op="ppermute", devices=n, shard_mb=mb, ms=ms,
         gb_per_s=shard_bytes / ms / 1e6)
  ms = timeit(gather, x, iters=10, warmup=2, repeats=5)
  record(section="link", op="all_gather", devices=n, shard_mb=mb, ms=ms,
         gb_per_s=(n - 1) * shard_bytes / ms / 1e6)


def _sharded(fn_of_mesh, n):
  mesh = _mesh(n)
  return mesh, fn_of_mesh(mesh)


def _moba(q, k, top_k, block=128):
  """A fixed MoBA selection (pooled scores, top-k + own + previous block, causal) computed
  once on one device: N-device and one-device runs visit the same blocks."""
  return jax.jit(lambda q, k: routing.topk_blocks(q, k, block, top_k, causal=True,
                                                  local_blocks=2).ids)(q, k)


def _check_row(name, n, fn_single, fn_many, mesh, args, **extra):
  try:
    want = fn_single(*args)
    got = fn_many(*(_place(mesh, x) for x in args))
    errs = [rel(g, w) for g, w in zip(got, want)]
    record(section="check", case=name, devices=n, err_out=errs[0], err_dq=errs[1],
           err_dk=errs[2], err_dv=errs[3], ok=bool(max(errs) < 2e-2), **extra)
  except Exception as e:  # noqa: BLE001
    record(section="check", case=name, devices=n, error=repr(e)[:400])
    traceback.print_exc()


def check(n, seq, spatial, backend, top_k=32):
  """N devices vs one device, same backend, bf16: relative errors of out and gradients."""
  cases = [
      ("causal ring contiguous", masks.causal(), "ring", "contiguous"),
      ("causal ring zigzag", masks.causal(), "ring", "zigzag"),
      ("causal window 2048 halo", masks.causal() & masks.sliding_window(2047), "halo",
       "contiguous"),
      ("causal allgather", masks.causal(), "allgather", "contiguous"),
  ]
  q, k, v, do = inputs((1, seq, 16, D), (1, seq, 8, D), jnp.bfloat16, seed=1)
  for name, mask, strategy, layout in cases:
    try:
      single = fwd_bwd(lambda q, k, v: jsa.attention(q, k, v, mask, backend=backend))
      want = single(q, k, v, do)
      mesh = _mesh(n)
      many = fwd_bwd(lambda q, k, v: jsa.attention(
          q, k, v, mask, backend=backend, mesh=mesh, context_axis="context", strategy=strategy,
          context_layout=layout))
      args = (q, k, v, do)
      if layout == "zigzag":
        args = tuple(cp.to_zigzag(x, n) for x in args)
      got = many(*(_place(mesh, x) for x in args))
      if layout == "zigzag":
        got = tuple(cp.from_zigzag(x, n) for x in got)
      errs = [rel(g, w) for g, w in zip(got, want)]
      record(section="check", case=name, devices=n, seq=seq, backend=backend,
             err_out=errs[0], err_dq=errs[1], err_dk=errs[2], err_dv=errs[3],
             ok=bool(max(errs) < 2e-2))
    except Exception as e:  # noqa: BLE001
      record(section="check", case=name, devices=n, error=repr(e)[:400])
      traceback.print_exc()
  mesh = _mesh(n)
  shape = (1,) + spatial + (16, D)
  na_op = lambda mesh, **kw: fwd_bwd(lambda q, k, v: jsa.na(
      q, k, v, NA["kernel"], backend=backend, mesh=mesh,
      context_axis=None if mesh is None else "context", **kw))
  _check_row(f"3-D NA {spatial} k8x16x16 halo", n, na_op(None), na_op(mesh, strategy="halo"),
             mesh, inputs(shape, shape, jnp.bfloat16, seed=2), backend=backend)
  # A padding mask on the 3-D grid (the last 8 columns of every frame, and a whole frame in
  # the middle): the keys' ids travel with the halos.
  valid = jnp.ones((1,) + spatial, bool).at[..., -8:].set(False)
  valid = valid.at[:, spatial[0] // 2].set(False)
  _check_row(f"3-D NA {spatial} k8x16x16 padded halo", n, na_op(None, kv_valid=valid),
             na_op(mesh, kv_valid=valid), mesh, inputs(shape, shape, jnp.bfloat16, seed=5),
             backend=backend)
  q, k, v, do = inputs((1, seq, 16, D), (1, seq, 8, D), jnp.bfloat16, seed=6)
  ids = _moba(q, k, top_k)
  moba = lambda mesh: fwd_bwd(lambda q, k, v: jsa.attention(
      q, k, v, masks.causal(), block_selection=routing.BlockSelection(ids, 128),
      backend=backend, mesh=mesh, context_axis=None if mesh is None else "context"))
  _check_row(f"MoBA S={seq} top {top_k} allgather", n, moba(None), moba(mesh), mesh,
             (q, k, v, do), backend=backend)


def scaling(n, seq, spatial, backend, reps, moba_seq=131072, top_k=32):
  """Causal and 3-D NA on one device and on n devices: forward and forward+backward ms."""
  flops = 4 * 16 * seq * seq * D / 2
  q, k, v, do = inputs((1, seq, 16, D), (1, seq, 16, D), jnp.bfloat16, seed=3)
  rows = [("1 device", 1, None, "contiguous")]
  rows += [(f"{n} devices {s} {lay}", n, s, lay) for s, lay in
           (("ring", "zigzag"), ("ring", "contiguous"), ("allgather", "zigzag"))]
  if jax.default_backend() == "gpu":
    try:
      cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                           implementation="cudnn")
      fwd = _time(jax.jit(cudnn), q, k, v, reps=reps)
      both = _time(fwd_bwd(cudnn), q, k, v, do, reps=reps)
      record(section="scaling", case=f"causal S={seq}", run="cuDNN, 1 device", fwd_ms=fwd,
             fwd_bwd_ms=both, fwd_tflops=flops / fwd / 1e9, fwd_bwd_tflops=3.5 * flops / both / 1e9)
    except Exception as e:  # noqa: BLE001
      record(section="scaling", case=f"causal S={seq}", run="cuDNN", error=repr(e)[:400])
  for name, devices, strategy, layout in rows:
    try:
      if devices == 1:
        op = lambda q, k, v: jsa.attention(q, k, v, masks.causal(), backend=backend)
        args = (q, k, v, do)
      else:
        mesh = _mesh(devices)
        op = lambda q, k, v, mesh=mesh, s=strategy, lay=layout: jsa.attention(
            q, k, v, masks.causal(), backend=backend, mesh=mesh, context_axis="context",
            strategy=s, context_layout=lay)
        args = tuple(_place(mesh, x) for x in (q, k, v, do))
      fwd = _time(jax.jit(op), *args[:3], reps=reps)
      both = _time(fwd_bwd(op), *args, reps=reps)
      record(section="scaling", case=f"causal S={seq}", run=name, devices=devices, fwd_ms=fwd,
             fwd_bwd_ms=both, fwd_tflops=flops / fwd / 1e9,
             fwd_bwd_tflops=3.5 * flops / both / 1e9)
    except Exception as e:  # noqa: BLE001
      record(section="scaling", case=f"causal S={seq}", run=name, error=repr(e)[:400])
      traceback.print_exc()
  # MoBA: the same fixed selection on 1 and n devices (all-gather; strong scaling).
  q, k, v, do = inputs((1, moba_seq, 16, D), (1, moba_seq, 16, D), jnp.bfloat16, seed=10)
  ids = _moba(q, k, top_k)
  for devices in (1, n):
    try:
      mesh = _mesh(devices) if devices > 1 else None
      op = lambda q, k, v, mesh=mesh: jsa.attention(
          q, k, v, masks.causal(), block_selection=routing.BlockSelection(ids, 128),
          backend=backend, mesh=mesh, context_axis="context" if mesh else None)
      args = (q, k, v, do) if mesh is None else tuple(_place(mesh, x) for x in (q, k, v, do))
      record(section="scaling", case=f"MoBA S={moba_seq} top {top_k}", devices=devices,
             run="allgather" if mesh else "1 device",
             fwd_ms=_time(jax.jit(op), *args[:3], reps=reps),
             fwd_bwd_ms=_time(fwd_bwd(op), *args, reps=reps))
    except Exception as e:  # noqa: BLE001
      record(section="scaling", case="MoBA", devices=devices, error=repr(e)[:400])
      traceback.print_exc()
  # Strong scaling (the same latent on 1 and n devices), then weak (n times the frames on n).
  for devices, frames in ((1, spatial[0]), (n, spatial[0]), (n, n * spatial[0])):
    shape = (1, frames) + spatial[1:] + (16, D)
    q, k, v, do = inputs(shape, shape, jnp.bfloat16, seed=4)
    try:
      if devices == 1:
        op = lambda q, k, v: jsa.na(q, k, v, NA["kernel"], backend=backend)
        args = (q, k, v, do)
      else:
        mesh = _mesh(devices)
        op = lambda q, k, v, mesh=mesh: jsa.na(q, k, v, NA["kernel"], backend=backend,
                                               mesh=mesh, context_axis="context")
        args = tuple(_place(mesh, x) for x in (q, k, v, do))
      fwd = _time(jax.jit(op), *args[:3], reps=reps)
      both = _time(fwd_bwd(op), *args, reps=reps)
      record(section="scaling", case=f"3-D NA {shape[1:4]} k8x16x16", devices=devices,
             kind="weak" if frames != spatial[0] else "strong", fwd_ms=fwd, fwd_bwd_ms=both)
    except Exception as e:  # noqa: BLE001
      record(section="scaling", case="3-D NA", devices=devices, error=repr(e)[:400])
      traceback.print_exc()


def _time_plan(backend, plan, shapes, reps, bwd_plan=None):
  """ms of one local plan on one device: forward, forward+backward."""
  q, k, v, do = inputs(shapes[0], shapes[1], jnp.bfloat16, seed=5)
  scale = 1 / math.sqrt(D)
  op = lambda q, k, v: ops.run_plan(backend, plan, scale, None, False, q, k, v,
                                    bwd_plan=bwd_plan)[0]
  return _time(jax.jit(op), q, k, v, reps=reps), _time(fwd_bwd(op), q, k, v, do, reps=reps)


def pieces(seq, slab, backend, link_gb_s, reps, shard_counts):
  """Each local kernel of the causal zigzag ring (strong scaling, S=seq) and of the 3-D NA
  halo (weak scaling, `slab` frames per device), timed on one device; the model's step time
  per device count (ring: each step the larger of its slowest kernel and the K/V send;
  halo: the larger of the own-slab kernel and the exchange, then the halo kernels)."""
  bw = link_gb_s * 1e9
  if any(c in "causal" for c in CASES):
    _causal_pieces(seq, backend, bw, reps, shard_counts)
  if any(c in "3-D NA" for c in CASES):
    _na_pieces(slab, backend, bw, reps, shard_counts)


def _causal_pieces(seq, backend, bw, reps, shard_counts):
  mask = masks.causal()
  backend = jsa.resolve_backend(backend, mask, dtype=jnp.bfloat16, head_dim=D)
  flops = 4 * 16 * seq * seq * D / 2
  q, k, v, do = inputs((1, seq, 16, D), (1, seq, 16, D), jnp.bfloat16, seed=3)
  peers = [("ours, 1 device", lambda q, k, v: jsa.attention(q, k, v, mask, backend=backend))]
  if jax.default_backend() == "gpu":
    peers.append(("cuDNN, 1 device", lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn")))
  for name, op in peers:
    try:
      fwd = _time(jax.jit(op), q, k, v, reps=reps)
      both = _time(fwd_bwd(op), q, k, v, do, reps=reps)
      record(section="pieces", case=f"causal S={seq} ring zigzag", devices=1, run=name,
             model_fwd_ms=fwd, model_fwd_bwd_ms=both, fwd_tflops=flops / fwd / 1e9,
             fwd_bwd_tflops=3.5 * flops / both / 1e9)
    except Exception as e:  # noqa: BLE001
      record(section="pieces", case="causal 1 device", run=name, error=repr(e)[:400])
  del q, k, v, do
  for n in shard_counts:
    try:
      bq, bk = ops._block_sizes(backend, D, jnp.bfloat16, None, None, seq // n, seq // n)
      plan = cp.plan_context(mask, seq, seq, n, bq, bk, "ring", "zigzag")
      times = [_time_plan(backend, p, ((1, seq // n, 16, D), (1, seq // n, 16, D)), reps)
               for p in plan.plans]
      send_s = 2 * (seq // n) * 16 * D * 2 / bw  # K and V of one shard, bf16
      fwd = sum(max(max(times[i][0] for i in row if i >= 0) / 1e3,
                    send_s if t + 1 < plan.steps else 0.0) for t, row in enumerate(plan.table))
      bwd = sum(max(max(times[i][1] - times[i][0] for i in row if i >= 0) / 1e3,
                    send_s if t + 1 < plan.steps else 0.0) for t, row in enumerate(plan.table))
      record(section="pieces", case=f"causal S={seq} ring zigzag", devices=n,
             local_fwd_ms=[round(t[0], 3) for t in times],
             local_fwd_bwd_ms=[round(t[1], 3) for t in times], send_ms=send_s * 1e3,
             model_fwd_ms=fwd * 1e3, model_fwd_bwd_ms=(fwd + bwd) * 1e3)
    except Exception as e:  # noqa: BLE001
      record(section="pieces", case="causal ring", devices=n, error=repr(e)[:400])
      traceback.print_exc()


def _na_pieces(slab, backend, bw, reps, shard_counts):
  rest = NA["frame"]
  for n in (1,) + tuple(shard_counts):
    try:
      frames = slab * n
      nmask = masks.neighborhood((frames,) + rest, NA["kernel"])
      backend = jsa.resolve_backend(backend, nmask, dtype=jnp.bfloat16, head_dim=D)
      impl = ops._get_backend(backend)
      bq, bk = ops._block_sizes(backend, D, jnp.bfloat16, None, None)
      q_tile, kv_tile = ops.auto_tiles(impl, nmask, bq, bk)
      local = lambda p: ((1,) + p.q_layout.spatial_shape + (16, D),
                         (1,) + p.kv_layout.spatial_shape + (16, D))
      if n == 1:
        one = jax.jit(lambda q, k, v: jsa.na(q, k, v, NA["kernel"], backend=backend))
        q, k, v, do = inputs((1, frames) + rest + (16, D), (1, frames) + rest + (16, D),
                             jnp.bfloat16, seed=6)
        fwd = _time(one, q, k, v, reps=reps)
        both = _time(fwd_bwd(lambda q, k, v: jsa.na(q, k, v, NA["kernel"], backend=backend)),
                     q, k, v, do, reps=reps)
        record(section="pieces", case=f"3-D NA {slab}x{NA['frame'][0]}x{NA['frame'][1]} per device k{NA['kernel']} halo",
               devices=1, model_fwd_ms=fwd, model_fwd_bwd_ms=both)
        continue
      if n == max(shard_counts):  # strong scaling: the whole latent on one device
        whole = (1, frames) + rest + (16, D)
        q, k, v, do = inputs(whole, whole, jnp.bfloat16, seed=6)
        op = lambda q, k, v: jsa.na(q, k, v, NA["kernel"], backend=backend)
        record(section="pieces", case=f"3-D NA {frames}x{rest[0]}x{rest[1]} on one device",
               devices=1, fwd_ms=_time(jax.jit(op), q, k, v, reps=reps),
               fwd_bwd_ms=_time(fwd_bwd(op), q, k, v, do, reps=reps))
        del q, k, v, do
      plan = cp.plan_context_nd(nmask, n, tuple(q_tile), tuple(kv_tile), "halo")
      fit = lambda t: cp._fit_tile(t, frames // n)  # as `jsa.na` on a mesh does
      bwd = [ops._backward_plan(impl, nmask, p, D, jnp.bfloat16, None, fit_tile=fit)
             if impl.gathers else None for p in plan.plans]
      times = [_time_plan(backend, p, local(p), reps, b) for p, b in zip(plan.plans, bwd)]
      halo_s = sum(plan.halo) * math.prod(rest) * 16 * D * 2 * 2 / bw
      per_shard = []
      for s in range(n):
        own = times[plan.table[0, s]] if plan.table[0, s] >= 0 else (0.0, 0.0)
        halos = [times[i] for i in plan.table[1:, s] if i >= 0]
        f = max(own[0] / 1e3, halo_s) + sum(h[0] for h in halos) / 1e3
        b = max((own[1] - own[0]) / 1e3, halo_s) + sum(h[1] - h[0] for h in halos) / 1e3
        per_shard.append((f, f + b))
      record(section="pieces", case=f"3-D NA {slab}x{NA['frame'][0]}x{NA['frame'][1]} per device k{NA['kernel']} halo",
             devices=n, halo=list(plan.halo), local_fwd_ms=[round(t[0], 3) for t in times],
             local_fwd_bwd_ms=[round(t[1], 3) for t in times], exchange_ms=halo_s * 1e3,
             model_fwd_ms=max(p[0] for p in per_shard) * 1e3,
             model_fwd_bwd_ms=max(p[1] for p in per_shard) * 1e3)
    except Exception as e:  # noqa: BLE001
      record(section="pieces", case="3-D NA halo", devices=n, error=repr(e)[:400])
      traceback.print_exc()


def emulate(backend, seq, spatial, n):
  """On one device: the N-shard computation (every local kernel, K/V part and LSE merge a
  device runs) against the single-device op, forward and gradients, bf16."""
  cases = [("causal ring zigzag", masks.causal(), "ring", "zigzag"),
           ("causal ring contiguous", masks.causal(), "ring", "contiguous"),
           ("causal window 2048 halo", masks.causal() & masks.sliding_window(2047), "halo",
            "contiguous"),
           ("window 2048 | sink 4, ring", masks.causal() & (masks.sliding_window(2047)
                                                          | masks.sink(4)), "ring", "contiguous")]
  q, k, v, do = inputs((1, seq, 16, D), (1, seq, 8, D), jnp.bfloat16, seed=7)
  for name, mask, strategy, layout in cases:
    if not any(c in name for c in CASES):
      continue
    try:
      be = jsa.resolve_backend(backend, mask, dtype=jnp.bfloat16, head_dim=D)
      bq, bk = ops._block_sizes(be, D, jnp.bfloat16, None, None, seq // n, seq // n)
      plan = cp.plan_context(mask, seq, seq, n, bq, bk, strategy, layout)
      want = fwd_bwd(lambda q, k, v: jsa.attention(q, k, v, mask, backend=backend))(q, k, v, do)
      got = fwd_bwd(lambda q, k, v: cp.emulate(plan, q, k, v, be, layout=layout))(q, k, v, do)
      errs = [rel(g, w) for g, w in zip(got, want)]
      record(section="emulate", case=name, shards=n, seq=seq, backend=backend,
             local_problems=len(plan.plans), steps=plan.steps, err_out=errs[0],
             err_dq=errs[1], err_dk=errs[2], err_dv=errs[3], ok=bool(max(errs) < 2e-2))
    except Exception as e:  # noqa: BLE001
      record(section="emulate", case=name, shards=n, error=repr(e)[:400])
      traceback.print_exc()
  for kernel, stride in ((NA["kernel"], 1), (NA["kernel"], tuple(x // 2 for x in NA["kernel"]))):
    if not any(c in "3-D NA" for c in CASES):
      continue
    try:
      shape = (1,) + spatial + (16, D)
      q, k, v, do = inputs(shape, shape, jnp.bfloat16, seed=8)
      nmask = masks.neighborhood(spatial, kernel, stride)
      be = jsa.resolve_backend(backend, nmask, dtype=jnp.bfloat16, head_dim=D)
      impl = ops._get_backend(be)
      bq, bk = ops._block_sizes(be, D, jnp.bfloat16, None, None)
      tiles = ops.auto_tiles(impl, nmask, bq, bk)
      plan = cp.plan_context_nd(nmask, n, tuple(tiles[0]), tuple(tiles[1]), "halo")
      want = fwd_bwd(lambda q, k, v: jsa.na(q, k, v, kernel, stride, backend=backend))(
          q, k, v, do)
      got = fwd_bwd(lambda q, k, v: cp.emulate(plan, q, k, v, be))(q, k, v, do)
      errs = [rel(g, w) for g, w in zip(got, want)]
      record(section="emulate", case=f"3-D NA {spatial} k{kernel} stride {stride} halo",
             shards=n, backend=backend, halo=list(plan.halo), local_problems=len(plan.plans),
             err_out=errs[0], err_dq=errs[1], err_dk=errs[2], err_dv=errs[3],
             ok=bool(max(errs) < 2e-2))
    except Exception as e:  # noqa: BLE001
      record(section="emulate", case="3-D NA halo", shards=n, error=repr(e)[:400])
      traceback.print_exc()


def size_one(backend, seq, reps):
  """A context axis of size 1 (one device) against no mesh: the same call."""
  q, k, v, do = inputs((2, seq, 16, D), (2, seq, 16, D), jnp.bfloat16, seed=9)
  mesh = _mesh(1)
  plain = fwd_bwd(lambda q, k, v: jsa.attention(q, k, v, masks.causal(), backend=backend))
  cp1 = fwd_bwd(lambda q, k, v: jsa.attention(q, k, v, masks.causal(), backend=backend,
                                              mesh=mesh, context_axis="context"))
  record(section="size_one", seq=seq, no_mesh_fwd_bwd_ms=_time(plain, q, k, v, do, reps=reps),
         context_axis_1_fwd_bwd_ms=_time(cp1, q, k, v, do, reps=reps),
         no_mesh_again_ms=_time(plain, q, k, v, do, reps=reps))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--small", action="store_true",
                      help="CPU smoke test: 8 forced host devices, small sizes, xla backend")
  parser.add_argument("--sections", default="link,check,scaling,emulate,size_one,pieces")
  parser.add_argument("--link-gb-s", type=float, default=None,
                      help="device-to-device GB/s for the model (default: the link section's)")
  parser.add_argument("--backend", default=None, help="default: auto (xla with --small)")
  parser.add_argument("--cases", default="", help="comma-separated name parts (emulate)")
  parser.add_argument("--shards", default=None, help="pieces' device counts, e.g. 2,4,8")
  parser.add_argument("--slab", type=int, default=None,
                      help="frames per device of the 3-D NA weak-scaling pieces (default 8)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  sections = args.sections.split(",")
  n = min(jax.device_count(), 8)
  if args.small:
    backend, seq, spatial, reps, counts, slab = "xla", 512, (8, 16, 16), 1, (2, 4), 4
    NA.update(kernel=(3, 5, 5), frame=(16, 16))
  else:
    backend, seq, spatial, reps, counts, slab = "auto", 262144, (16, 128, 128), 3, (2, 4, 8), 8
  backend = args.backend or backend
  CASES[:] = args.cases.split(",")
  counts = tuple(int(c) for c in args.shards.split(",")) if args.shards else counts
  head = dict(header(), devices=jax.device_count(), backend=backend)
  print(head, flush=True)
  link_gb_s = args.link_gb_s
  if "link" in sections and n >= 2:
    try:
      link(n, 4 if args.small else 256)
      link_gb_s = link_gb_s or next(r["gb_per_s"] for r in RESULTS if r.get("op") == "ppermute")
    except Exception as e:  # noqa: BLE001
      record(section="link", error=repr(e)[:400])
    write_results(args.out, head)
  link_gb_s = link_gb_s or cp.Hardware().link_bytes_per_s / 1e9
  if "check" in sections and n >= 2:
    check(n, 4096 if args.small else 32768, (8, 16, 16) if args.small else (16, 64, 64),
          backend, 4 if args.small else 32)
    write_results(args.out, head)
  if "scaling" in sections and n >= 2:
    scaling(n, seq, spatial, backend, reps, *((4096, 4) if args.small else ()))
    write_results(args.out, head)
  if "emulate" in sections:
    emulate(backend, 8192 if args.small else 32768, (8, 16, 16) if args.small else (16, 64, 64),
            4)
    write_results(args.out, head)
  if "size_one" in sections:
    size_one(backend, 512 if args.small else 16384, reps)
    write_results(args.out, head)
  if "pieces" in sections:
    pieces(seq, args.slab or (2 if args.small else slab), backend, link_gb_s, reps, counts)
    write_results(args.out, head)


if __name__ == "__main__":
  if "--small" in os.sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  main()
