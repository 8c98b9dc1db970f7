"""Training-step time of the models with our kernels vs dense `jax.nn.dot_product_attention`.

    python -m benchmarks.bench_models [--out results.json]

Same model, same data, bf16 compute where the GPU supports it; the "dense" rows replace every
attention layer by full (or plain causal) cuDNN attention, so they show what the sparse masks
save at these sizes (they are not the same function).
"""
from __future__ import annotations

import argparse
import datetime
import json
import time

import numpy as np

import jax
from flax import nnx

from models import causal_lm, nat_classifier, video_dit
from models.train import compiled_step, make_optimizer

BF16 = jax.numpy.bfloat16


def step_time(model, loss_fn, batch, iters=10):
  """Milliseconds per training step: the functional step (`models.train.compiled_step`, state
  donated and threaded through the loop as in training), so it measures the device, not
  `nnx.jit`'s per-call walk of the Python object graph."""
  step, state = compiled_step(model, make_optimizer(model, 100), loss_fn)
  times = []
  for repeat in range(4):  # the first is the warm-up
    loss, state = step(state, batch)
    jax.block_until_ready(loss)
    t = time.perf_counter()
    for _ in range(iters):
      loss, state = step(state, batch)
    jax.block_until_ready(loss)
    times.append((time.perf_counter() - t) / iters)
  return float(np.median(times[1:])) * 1e3


def cases(backend, quick=False):
  """(name, model factory, loss, batch) per model; `quick`: tiny sizes for a CPU smoke run."""
  if quick:
    yield ("causal LM 256 tokens, window 32 + 4 sinks",
           lambda: causal_lm.CausalLM(depth=1, backend=backend, rngs=nnx.Rngs(0)),
           causal_lm.loss_fn,
           next(causal_lm.synthetic_batches(2, 256)))
    yield ("NAT classifier 32x32 images, kernel 5",
           lambda: nat_classifier.NATClassifier(image_size=32, dims=(16, 32), depths=(1, 1),
                                                heads=(2, 2), kernel=5, patch=2, backend=backend,
                                                rngs=nnx.Rngs(0)),
           nat_classifier.loss_fn, next(nat_classifier.synthetic_batches(2, 32)))
    return
  yield ("NAT classifier 256x256 images, kernel 13",
         lambda: nat_classifier.NATClassifier(image_size=256, dims=(128, 256), depths=(2, 2),
                                              heads=(4, 8), kernel=13, patch=2, backend=backend,
                                              attn_dtype=BF16, rngs=nnx.Rngs(0)),
         nat_classifier.loss_fn, next(nat_classifier.synthetic_batches(8, 256)))
  yield ("video DiT latent 8x48x48, kernel (3,9,9)",
         lambda: video_dit.VideoDiT(channels=16, dim=256, depth=4, heads=4, kernel=(3, 9, 9),
                                    backend=backend, attn_dtype=BF16, rngs=nnx.Rngs(0)),
         video_dit.loss_fn, next(video_dit.synthetic_batches(4, 48, frames=8, channels=16)))
  yield ("causal LM 8192 tokens, window 512 + 4 sinks",
         lambda: causal_lm.CausalLM(vocab=256, dim=512, depth=4, heads=8, kv_heads=2, window=512,
                                    backend=backend, attn_dtype=BF16, rngs=nnx.Rngs(0)),
         causal_lm.loss_fn, next(causal_lm.synthetic_batches(2, 8192, vocab=256)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--backends", default="auto,dense")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  rows = []
  for backend in args.backends.split(","):
    for name, make, loss_fn, batch in cases(backend):
      try:
        ms = step_time(make(), loss_fn, batch)
        row = dict(model=name, backend=backend, step_ms=round(ms, 3))
      except Exception as e:  # keep going
        row = dict(model=name, backend=backend, error=repr(e)[:300])
      rows.append(row)
      print(json.dumps(row), flush=True)
  if args.out:
    dev = jax.devices()[0]
    with open(args.out, "w") as f:
      json.dump(dict(device=dev.device_kind, date=datetime.date.today().isoformat(),
                     jax=jax.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
