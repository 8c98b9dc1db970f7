"""NAT/DiNAT-style hierarchical 2-D neighborhood-attention image classifier.

Patch embedding -> stages of [LayerNorm, 2-D NA (dilated in alternate blocks, DiNAT), LayerNorm,
MLP] -> strided-conv downsampling between stages -> pooled linear head. Trained on a synthetic
shape-classification task (made here, no downloads).

    python -m models.nat_classifier --steps 200 --batch 16 --size 32
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp
import optax
from flax import nnx

from jax_sparse_attn.nn import NeighborhoodAttention2D
from models.train import mlp, run_cli


class NABlock(nnx.Module):
  def __init__(self, dim, heads, kernel, dilation, backend, rngs, attn_dtype=None):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = NeighborhoodAttention2D(dim, heads, kernel, dilation=dilation, backend=backend,
                                        dtype=attn_dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp = mlp(rngs, dim, 2 * dim)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class NATClassifier(nnx.Module):
  def __init__(self, num_classes=4, dims=(32, 64), depths=(2, 2), heads=(2, 4), kernel=5,
               patch=2, image_size=32, backend="auto", attn_dtype=None, *, rngs: nnx.Rngs):
    self.embed = nnx.Conv(3, dims[0], (patch, patch), strides=(patch, patch), rngs=rngs)
    stages, downs = [], []
    side = image_size // patch
    for s, (dim, depth, h) in enumerate(zip(dims, depths, heads)):
      k = min(kernel, side)
      blocks = []
      for b in range(depth):
        # DiNAT: alternate dense-local and dilated neighborhoods (when the map is big enough).
        dil = 2 if b % 2 and k * 2 <= side else 1
        blocks.append(NABlock(dim, h, k, dil, backend, rngs, attn_dtype))
      stages.append(nnx.List(blocks))
      if s + 1 < len(dims):
        downs.append(nnx.Conv(dim, dims[s + 1], (2, 2), strides=(2, 2), rngs=rngs))
        side //= 2
    self.stages = nnx.List(stages)
    self.downs = nnx.List(downs)
    self.norm = nnx.LayerNorm(dims[-1], rngs=rngs)
    self.head = nnx.Linear(dims[-1], num_classes, rngs=rngs)

  def __call__(self, images):  # [batch, H, W, 3]
    x = self.embed(images)
    for s, blocks in enumerate(self.stages):
      for block in blocks:
        x = block(x)
      if s < len(self.downs):
        x = self.downs[s](x)
    return self.head(self.norm(x).mean(axis=(1, 2)))


def synthetic_batches(batch, size, seed=0, num_classes=4):
  """Images of a bright square, disc, horizontal or vertical bar at random places, with noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  while True:
    labels = rng.integers(0, num_classes, batch)
    imgs = rng.normal(0, 0.3, (batch, size, size, 3)).astype(np.float32)
    for i, c in enumerate(labels):
      cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
      r = size // 6
      shape = [(abs(yy - cy) < r) & (abs(xx - cx) < r),
               (yy - cy) ** 2 + (xx - cx) ** 2 < r * r,
               (abs(yy - cy) < r // 3 + 1) & (abs(xx - cx) < 2 * r),
               (abs(xx - cx) < r // 3 + 1) & (abs(yy - cy) < 2 * r)][c]
      imgs[i, shape] += 1.5
    yield jnp.asarray(imgs), jnp.asarray(labels)


def loss_fn(model, batch):
  images, labels = batch
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model(images), labels))


def main():
  run_cli(__doc__, dict(steps=200, batch=16, size=32),
          lambda a: NATClassifier(image_size=a.size, backend=a.backend, rngs=nnx.Rngs(a.seed)),
          loss_fn, lambda a: synthetic_batches(a.batch, a.size, a.seed))


if __name__ == "__main__":
  main()
