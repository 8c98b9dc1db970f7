"""Why the models/ causal LM's training step (8192 tokens, dim 512, 8/2 heads of 64, window 512
+ 4 sinks, 2 packed documents, depth 4) is no faster with our attention than with plain causal
cuDNN attention: the step per attention backend, and the attention alone at the model's
shapes (forward, forward+backward) per backend beside cuDNN's causal attention, with and
without the documents' block maps.

    python -m benchmarks.diag.diag_lm_model --out x.json
"""
import argparse

import jax
import jax.numpy as jnp
from flax import nnx

import jax_sparse_attn as jsa
from jax_sparse_attn import block_map, masks, ops
from jax_sparse_attn.layout import SequenceLayout
from jax_sparse_attn.plan import make_plan
from jax_sparse_attn.demo import time_ms
from pallas_kernels.gpu.mosaic_gpu import attention_bwd as bwd
from models import causal_lm

from . import Rows
from ..bench_gpu import fwd_bwd
from ..bench_models import BF16, step_time


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--backends", default="auto,mosaic_gpu,triton,dense")
  parser.add_argument("--parts", default="model,attention")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  rows = Rows()
  record = rows.record

  tokens, seg = next(causal_lm.synthetic_batches(2, 8192, vocab=256))
  for backend in args.backends.split(",") if "model" in args.parts else ():
    try:
      model = causal_lm.CausalLM(vocab=256, dim=512, depth=4, heads=8, kv_heads=2, window=512,
                                 backend=backend, attn_dtype=BF16, rngs=nnx.Rngs(0))
      record(part="model step", backend=backend,
             ms=step_time(model, causal_lm.loss_fn, (tokens, seg)))
    except Exception as e:  # noqa: BLE001 (a backend that fails is a result)
      record(part="model step", backend=backend, error=repr(e)[:300])

  b, s, h, hkv, d = 2, 8192, 8, 2, 64
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(ks[0], (b, s, h, d), BF16)
  k, v = (jax.random.normal(x, (b, s, hkv, d), BF16) for x in ks[1:3])
  do = jax.random.normal(ks[3], (b, s, h, d), BF16)
  ids = seg[:, :s]
  mask = masks.causal() & (masks.sliding_window(511) | masks.sink(4))
  variants = {
      "cudnn causal (the dense peer)": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="cudnn"),
      "cudnn causal window 512": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="cudnn", local_window_size=(511, 0)),
  }
  for backend in ("mosaic_gpu", "triton"):
    labels = [("documents", True, True), ("documents, static map", False, True)]
    if backend == "mosaic_gpu":
      labels.append(("documents, runtime work items", True, False))
    for label, maps, static_items in labels:
      def fn(q, k, v, backend=backend, maps=maps, static_items=static_items):
        saved = ops.SEGMENT_BLOCK_MAPS, bwd.SHARED_STATIC_ITEMS
        ops.SEGMENT_BLOCK_MAPS, bwd.SHARED_STATIC_ITEMS = maps, static_items
        try:
          return jsa.attention(q, k, v, mask, segment_ids=ids, backend=backend)
        finally:
          ops.SEGMENT_BLOCK_MAPS, bwd.SHARED_STATIC_ITEMS = saved
      variants[f"{backend}: {label}"] = fn
    variants[f"{backend}: no documents"] = (
        lambda q, k, v, backend=backend: jsa.attention(q, k, v, mask, backend=backend))
    variants[f"{backend}: causal (the bound's base)"] = (
        lambda q, k, v, backend=backend: jsa.attention(q, k, v, masks.causal(), backend=backend))
  blocks = lambda m: make_plan(m, SequenceLayout(s, 128), SequenceLayout(s, 128)).block_map
  lm, causal = blocks(mask), blocks(masks.causal())
  docs = block_map.from_segments(ids, ids, lm)
  record(part="blocks (128²)", lm=int(lm.num_visited), causal=int(causal.num_visited),
         lm_documents_per_batch=float(jnp.sum(docs.kv_counts)) / b)
  for label, fn in variants.items():
    try:
      record(part="attention at the model's shapes", variant=label,
             fwd_ms=time_ms(jax.jit(fn), q, k, v, iters=20, repeats=5),
             fwd_bwd_ms=time_ms(fwd_bwd(fn), q, k, v, do, iters=20, repeats=5))
    except Exception as e:  # noqa: BLE001
      record(part="attention at the model's shapes", variant=label, error=repr(e)[:300])
  rows.write(args.out)


if __name__ == "__main__":
  main()
