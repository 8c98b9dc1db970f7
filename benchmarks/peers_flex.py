"""torch FlexAttention on benchmark problems, in its own process (`benchmarks.cli`).

    python -m benchmarks.peers_flex '[{"name": ..., "q_shape": [...], "kv_shape": [...],
        "dtype": "bfloat16", "mask": {"kind": "causal"} | {"spatial": [...], ...}}, ...]'

Prints one JSON line per problem: name, fwd_ms, fwd_bwd_ms (triton.testing.do_bench medians, compiled
flex_attention, the block mask built once outside the timing), or error. Masks: dense, causal,
causal window (`window` keys to the left), the same with sink keys, and NATTEN-style neighborhoods (stride 1 or more,
no dilation) on [batch, *spatial, heads, head_dim] flattened row-major.
"""
from __future__ import annotations

import json
import sys


def _na_bounds(torch, x, length, kernel, stride):
  """Window start per coordinate, as `masks.gna_bounds_1d` (no dilation, not causal): a
  stride group's queries share the window of its leader."""
  leader = torch.clamp((x // stride) * stride + stride // 2, max=length - 1)
  return torch.clamp(leader - kernel // 2, min=0, max=length - kernel)


def main(specs_json: str):
  for spec in json.loads(specs_json):
    try:
      row = run(spec)
    except Exception as e:  # noqa: BLE001 - one failure must not hide the others
      row = dict(error=repr(e)[:300])
    print(json.dumps(dict(name=spec["name"], **row)), flush=True)
    _free_gpu_memory()


def _free_gpu_memory():
  try:
    import torch
    torch.cuda.empty_cache()
  except Exception:  # noqa: BLE001 - no torch or no GPU: nothing to free
    pass


def run(spec):
  import torch
  from torch.nn.attention.flex_attention import create_block_mask, flex_attention
  from triton.testing import do_bench
  # One process compiles every case: past dynamo's recompile limit (8) torch.compile falls
  # back to eager Flex, which materializes the scores (the strided 3-D case asked for 256 GiB,
  # the blocksparse one ran at 0.9 TFLOP/s in the first 2026-12-03 headline call).
  torch._dynamo.reset()
  torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
  dev = "cuda"
  dtype = getattr(torch, spec["dtype"])
  qs, ks = spec["q_shape"], spec["kv_shape"]
  b, h, d, hkv = qs[0], qs[-2], qs[-1], ks[-2]
  n = 1
  for x in qs[1:-2]:
    n *= x
  mask = spec["mask"]
  if "spatial" in mask:
    spatial, kernel, stride = mask["spatial"], mask["kernel"], mask["stride"]
    strides = [1] * len(spatial)
    for i in range(len(spatial) - 2, -1, -1):
      strides[i] = strides[i + 1] * spatial[i + 1]

    def mask_mod(bi, hi, qi, ki):
      ok = qi >= 0
      for i, length in enumerate(spatial):
        qc, kc = (qi // strides[i]) % length, (ki // strides[i]) % length
        start = _na_bounds(torch, qc, length, kernel[i], stride[i])
        ok = ok & (kc >= start) & (kc < start + kernel[i])
      return ok
  elif mask["kind"] == "dense":
    mask_mod = None
  elif mask["kind"] == "causal":
    mask_mod = lambda bi, hi, qi, ki: qi >= ki
  elif mask["kind"] == "window":
    w = mask["window"]
    mask_mod = lambda bi, hi, qi, ki: (qi >= ki) & (qi - ki <= w)
  else:  # "window_sink": causal & (window | the first `sinks` keys)
    w, sinks = mask["window"], mask["sinks"]
    mask_mod = lambda bi, hi, qi, ki: (qi >= ki) & ((qi - ki <= w) | (ki < sinks))
  block = None if mask_mod is None else create_block_mask(mask_mod, None, None, n, n, device=dev)
  q = torch.randn(b, h, n, d, device=dev, dtype=dtype, requires_grad=True)
  k = torch.randn(b, hkv, n, d, device=dev, dtype=dtype, requires_grad=True)
  v = torch.randn(b, hkv, n, d, device=dev, dtype=dtype, requires_grad=True)
  flex = torch.compile(flex_attention, dynamic=False)
  kw = dict(block_mask=block, enable_gqa=hkv != h)
  fwd = lambda: flex(q, k, v, **kw)
  do = torch.randn_like(q)

  def both():
    out = flex(q, k, v, **kw)
    out.backward(do)

  return dict(fwd_ms=round(do_bench(fwd), 4), fwd_bwd_ms=round(do_bench(both), 4))


if __name__ == "__main__":
  main(sys.argv[1])
