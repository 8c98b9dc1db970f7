"""Why torch Flex is ~0.9 TFLOP/s on the headline's blocksparse case (causal & (window 512 |
4 sinks), S=8192, GQA 16/4): times Flex with enable_gqa, with K/V repeated to 16 heads, and
with 4 query heads (no GQA), forward and fwd+bwd. Prints one JSON line."""
import json
import sys


def main():
  import torch
  from torch.nn.attention.flex_attention import create_block_mask, flex_attention
  from triton.testing import do_bench
  dev, dt = "cuda", torch.bfloat16
  b, n, h, hkv, d, w, sinks = 1, 8192, 16, 4, 128, 512, 4
  if len(sys.argv) > 1:
    b = int(sys.argv[1])
  mm = lambda bi, hi, qi, ki: (qi >= ki) & ((qi - ki <= w) | (ki < sinks))
  block = create_block_mask(mm, None, None, n, n, device=dev)
  flex = torch.compile(flex_attention, dynamic=False)
  out = {"batch": b}
  for name, hq, hk, gqa in (("gqa", h, hkv, True), ("repeat_kv", h, h, False),
                            ("mha4", hkv, hkv, False)):
    q = torch.randn(b, hq, n, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, hk, n, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, hk, n, d, device=dev, dtype=dt, requires_grad=True)
    do = torch.randn_like(q)
    kw = dict(block_mask=block, enable_gqa=gqa)

    def both():
      flex(q, k, v, **kw).backward(do)
    try:
      out[name] = dict(fwd_ms=round(do_bench(lambda: flex(q, k, v, **kw)), 4),
                       fwd_bwd_ms=round(do_bench(both), 4))
    except Exception as e:  # noqa: BLE001 - report and go on
      out[name] = repr(e)[:300]
  print(json.dumps(out))


if __name__ == "__main__":
  main()
