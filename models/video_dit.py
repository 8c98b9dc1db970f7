"""Video DiT block stack with 3-D neighborhood attention on a latent [T, H, W, C].

Each block: adaLN-Zero modulation from the diffusion time, 3-D NA (causal in time optional),
MLP. Objective: predict the noise added to synthetic videos of moving blobs (made here).

    python -m models.video_dit --steps 200 --batch 4 --size 16
    python -m models.video_dit --context-parallel 4   # frames sharded over 4 devices
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp
from flax import nnx

from jax_sparse_attn.nn import NeighborhoodAttention3D
from models.train import mlp, run_cli


def timestep_embedding(t, dim):
  freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(dim // 2) / (dim // 2))
  args = t[:, None] * 1000.0 * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class DiTBlock(nnx.Module):
  def __init__(self, dim, heads, kernel, causal_time, backend, rngs, attn_dtype=None,
               context_axis=None):
    self.norm1 = nnx.LayerNorm(dim, use_scale=False, use_bias=False, rngs=rngs)
    self.attn = NeighborhoodAttention3D(dim, heads, kernel, is_causal=(causal_time, False, False),
                                        use_rope=True, qk_norm=True, backend=backend,
                                        dtype=attn_dtype, context_axis=context_axis, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, use_scale=False, use_bias=False, rngs=rngs)
    self.mlp = mlp(rngs, dim, 4 * dim)
    self.ada = nnx.Linear(dim, 6 * dim, rngs=rngs, kernel_init=nnx.initializers.zeros_init())

  def __call__(self, x, cond):  # x [b, t, h, w, c], cond [b, c]
    s1, b1, g1, s2, b2, g2 = jnp.split(self.ada(nnx.silu(cond))[:, None, None, None], 6, axis=-1)
    x = x + g1 * self.attn(self.norm1(x) * (1 + s1) + b1)
    return x + g2 * self.mlp(self.norm2(x) * (1 + s2) + b2)


class VideoDiT(nnx.Module):
  def __init__(self, channels=4, dim=48, depth=2, heads=4, kernel=(3, 5, 5), causal_time=True,
               backend="auto", attn_dtype=None, context_axis=None, *, rngs: nnx.Rngs):
    self.proj_in = nnx.Linear(channels, dim, rngs=rngs)
    self.time = nnx.Sequential(nnx.Linear(dim, dim, rngs=rngs), nnx.silu,
                               nnx.Linear(dim, dim, rngs=rngs))
    self.blocks = nnx.List([DiTBlock(dim, heads, kernel, causal_time, backend, rngs, attn_dtype,
                                     context_axis) for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.proj_out = nnx.Linear(dim, channels, rngs=rngs)
    self.dim = dim

  def __call__(self, x_noisy, t):
    cond = self.time(timestep_embedding(t, self.dim))
    x = self.proj_in(x_noisy)
    for block in self.blocks:
      x = block(x, cond)
    return self.proj_out(self.norm(x))


def synthetic_batches(batch, size, frames=4, channels=4, seed=0):
  """Latent 'videos': Gaussian blobs moving with constant velocity, plus (t, noise)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  while True:
    vids = np.zeros((batch, frames, size, size, channels), np.float32)
    for b in range(batch):
      pos = rng.uniform(0, size, 2)
      vel = rng.uniform(-2, 2, 2)
      amp = rng.normal(0, 1, channels)
      for f in range(frames):
        cy, cx = pos + f * vel
        vids[b, f] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)[..., None] * amp
    t = rng.uniform(0, 1, batch).astype(np.float32)
    noise = rng.normal(0, 1, vids.shape).astype(np.float32)
    yield jnp.asarray(vids), jnp.asarray(t), jnp.asarray(noise)


def loss_fn(model, batch):
  x0, t, noise = batch
  a = jnp.cos(t * jnp.pi / 2)[:, None, None, None, None]
  s = jnp.sin(t * jnp.pi / 2)[:, None, None, None, None]
  pred = model(a * x0 + s * noise, t)
  return jnp.mean((pred - noise) ** 2)


def main():
  run_cli(__doc__, dict(steps=200, batch=4, size=16, frames=4),
          lambda a: VideoDiT(backend=a.backend, context_axis=a.context_axis,
                             rngs=nnx.Rngs(a.seed)), loss_fn,
          lambda a: synthetic_batches(a.batch, a.size, frames=a.frames, seed=a.seed))


if __name__ == "__main__":
  main()
