"""Text-to-image DiT with joint attention (MM-DiT style, as in Flux / SD3), where the image
tokens attend to their 2-D neighborhood plus every text token and the text tokens attend to
everything.

Each block projects both streams with their own weights, then:

* image queries: `na2d` over the image with the text keys/values as extra tokens
  (``additional_keys``; padded text masked by ``additional_valid``);
* text queries: plain `attention` over [image tokens, text tokens] (padded text masked by
  segment ids).

Objective: predict the noise added to synthetic images whose content (a blob's position and
colour) is written in the "text" (made here), so the image stream has a reason to read it.

    python -m models.text_to_image --steps 200 --batch 4 --size 16
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_sparse_attn as jsa
from models.train import mlp, run_cli
from models.video_dit import timestep_embedding

VOCAB, MAX_TEXT = 64, 8  # token ids; text length (padded)


def joint_attention(q_img, k_img, v_img, q_txt, k_txt, v_txt, txt_valid, kernel_size, *,
                    backend="auto"):
  """Image [b, h, w, heads, d] and text [b, n, heads, d] streams -> (image out, text out).

  The README's worked example: image tokens see their neighborhood and the valid text
  tokens; text tokens see every image token and the valid text tokens."""
  b, n = q_txt.shape[:2]
  img_out = jsa.na2d(q_img, k_img, v_img, kernel_size, additional_keys=k_txt,
                     additional_values=v_txt, additional_valid=txt_valid, backend=backend)
  flat = lambda x: x.reshape(b, -1, *x.shape[-2:])
  n_img = flat(k_img).shape[1]
  kv_seg = jnp.concatenate([jnp.zeros((b, n_img), jnp.int32),
                            jnp.where(txt_valid, 0, 1).astype(jnp.int32)], axis=1)
  txt_out = jsa.attention(q_txt, jnp.concatenate([flat(k_img), k_txt], axis=1),
                          jnp.concatenate([flat(v_img), v_txt], axis=1),
                          segment_ids=(jnp.zeros((b, n), jnp.int32), kv_seg), backend=backend)
  return img_out, txt_out


class _Stream(nnx.Module):
  """One stream's projections, norms and MLP (its own weights, as in MM-DiT)."""

  def __init__(self, dim, heads, rngs):
    self.heads, self.head_dim = heads, dim // heads
    self.norm1 = nnx.LayerNorm(dim, use_scale=False, use_bias=False, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.q_norm = nnx.RMSNorm(self.head_dim, rngs=rngs)
    self.k_norm = nnx.RMSNorm(self.head_dim, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, use_scale=False, use_bias=False, rngs=rngs)
    self.mlp = mlp(rngs, dim, 4 * dim)
    self.ada = nnx.Linear(dim, 6 * dim, rngs=rngs, kernel_init=nnx.initializers.zeros_init())

  def project(self, x, cond):
    mods = jnp.split(self.ada(nnx.silu(cond)), 6, axis=-1)
    expand = lambda m: m.reshape(m.shape[:1] + (1,) * (x.ndim - 2) + m.shape[1:])
    s1, b1, g1, s2, b2, g2 = map(expand, mods)
    q, k, v = jnp.split(self.qkv(self.norm1(x) * (1 + s1) + b1), 3, axis=-1)
    heads = lambda t: t.reshape(t.shape[:-1] + (self.heads, self.head_dim))
    return self.q_norm(heads(q)), self.k_norm(heads(k)), heads(v), (g1, s2, b2, g2)

  def finish(self, x, o, mods):
    g1, s2, b2, g2 = mods
    x = x + g1 * self.out(o.reshape(o.shape[:-2] + (-1,)))
    return x + g2 * self.mlp(self.norm2(x) * (1 + s2) + b2)


class JointBlock(nnx.Module):
  def __init__(self, dim, heads, kernel_size, backend, rngs):
    self.image, self.text = _Stream(dim, heads, rngs), _Stream(dim, heads, rngs)
    self.kernel_size, self.backend = kernel_size, backend

  def __call__(self, img, txt, txt_valid, cond):
    qi, ki, vi, mi = self.image.project(img, cond)
    qt, kt, vt, mt = self.text.project(txt, cond)
    oi, ot = joint_attention(qi, ki, vi, qt, kt, vt, txt_valid, self.kernel_size,
                             backend=self.backend)
    return self.image.finish(img, oi, mi), self.text.finish(txt, ot, mt)


class TextToImageDiT(nnx.Module):
  def __init__(self, channels=3, dim=32, depth=2, heads=4, kernel_size=5, backend="auto", *,
               rngs: nnx.Rngs):
    self.proj_in = nnx.Linear(channels, dim, rngs=rngs)
    self.embed = nnx.Embed(VOCAB, dim, rngs=rngs)
    self.time = nnx.Sequential(nnx.Linear(dim, dim, rngs=rngs), nnx.silu,
                               nnx.Linear(dim, dim, rngs=rngs))
    self.blocks = nnx.List([JointBlock(dim, heads, kernel_size, backend, rngs)
                            for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.proj_out = nnx.Linear(dim, channels, rngs=rngs)
    self.dim = dim

  def __call__(self, x_noisy, t, text, txt_valid):
    cond = self.time(timestep_embedding(t, self.dim))
    img, txt = self.proj_in(x_noisy), self.embed(text)
    for block in self.blocks:
      img, txt = block(img, txt, txt_valid, cond)
    return self.proj_out(self.norm(img))


COLORS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], np.float32)


def synthetic_batches(batch, size, channels=3, seed=0):
  """Images of one blob whose row, column and colour are the text's tokens (ids 1..),
  followed by filler tokens and padding of random length; plus (t, noise)."""
  if 2 * size + len(COLORS) >= VOCAB - 1:
    raise ValueError(f"size must be below {(VOCAB - 2 - len(COLORS)) // 2} (token ids), got {size}")
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  while True:
    imgs = np.zeros((batch, size, size, channels), np.float32)
    text = np.zeros((batch, MAX_TEXT), np.int32)
    valid = np.zeros((batch, MAX_TEXT), bool)
    for b in range(batch):
      cy, cx, c = rng.integers(0, size), rng.integers(0, size), rng.integers(0, len(COLORS))
      imgs[b] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0)[..., None] * COLORS[c]
      n = rng.integers(3, MAX_TEXT + 1)
      text[b, :3] = [1 + cy, 1 + size + cx, 1 + 2 * size + c]
      text[b, 3:n] = VOCAB - 1  # filler words
      valid[b, :n] = True
    t = rng.uniform(0, 1, batch).astype(np.float32)
    noise = rng.normal(0, 1, imgs.shape).astype(np.float32)
    yield (jnp.asarray(imgs), jnp.asarray(t), jnp.asarray(noise), jnp.asarray(text),
           jnp.asarray(valid))


def loss_fn(model, batch):
  x0, t, noise, text, valid = batch
  a = jnp.cos(t * jnp.pi / 2)[:, None, None, None]
  s = jnp.sin(t * jnp.pi / 2)[:, None, None, None]
  pred = model(a * x0 + s * noise, t, text, valid)
  return jnp.mean((pred - noise) ** 2)


def main():
  run_cli(__doc__, dict(steps=200, batch=4, size=16),
          lambda a: TextToImageDiT(backend=a.backend, rngs=nnx.Rngs(a.seed)), loss_fn,
          lambda a: synthetic_batches(a.batch, a.size, seed=a.seed))


if __name__ == "__main__":
  main()
