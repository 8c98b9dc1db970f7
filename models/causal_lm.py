"""Causal language model with sliding-window attention plus sink tokens (StreamingLLM-style
mask: ``causal() & (sliding_window(w) | sink(n))``), RoPE, GQA, packed documents.

Data: a synthetic language (made here) whose next token depends on recent context: sequences
of repeated random motifs, so a model that attends within its window learns to copy.

    python -m models.causal_lm --steps 200 --batch 8 --size 128
    python -m models.causal_lm --context-parallel 4   # sequence sharded over 4 devices
    python -m models.causal_lm --moba 16 2            # MoBA: top-2 blocks of 16 per query block
    python -m models.causal_lm --moba 16 2 --moba-shared  # one selection per GQA group (NSA)
    python -m models.causal_lm --learned-sinks        # gpt-oss sink logits, one per head
    python -m models.causal_lm --logits-soft-cap 50   # Gemma 2's capped attention scores
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp
import optax
from flax import nnx

from jax_sparse_attn import masks
from jax_sparse_attn.nn import MixtureOfBlockAttention, SparseAttention
from models.train import mlp, run_cli


class Block(nnx.Module):
  def __init__(self, dim, heads, kv_heads, mask, backend, rngs, attn_dtype=None,
               context_axis=None, moba=None, learned_sinks=False, logits_soft_cap=None,
               moba_shared=False):
    self.norm1 = nnx.RMSNorm(dim, rngs=rngs)
    if moba is not None:  # (block_size, top_k): content-routed blocks instead of the mask
      self.attn = MixtureOfBlockAttention(dim, heads, *moba, local_blocks=1,
                                          shared_by_group=moba_shared,
                                          num_kv_heads=kv_heads, use_rope=True,
                                          backend=backend, dtype=attn_dtype,
                                          context_axis=context_axis,
                                          learned_sinks=learned_sinks,
                                          logits_soft_cap=logits_soft_cap, rngs=rngs)
    else:
      self.attn = SparseAttention(dim, heads, mask, num_kv_heads=kv_heads, use_rope=True,
                                  backend=backend, dtype=attn_dtype, context_axis=context_axis,
                                  learned_sinks=learned_sinks,
                                  logits_soft_cap=logits_soft_cap, rngs=rngs)
    self.norm2 = nnx.RMSNorm(dim, rngs=rngs)
    self.mlp = mlp(rngs, dim, 4 * dim)

  def __call__(self, x, segment_ids):
    x = x + self.attn(self.norm1(x), segment_ids)
    return x + self.mlp(self.norm2(x))


class CausalLM(nnx.Module):
  def __init__(self, vocab=64, dim=64, depth=2, heads=4, kv_heads=2, window=32, sinks=4,
               backend="auto", attn_dtype=None, context_axis=None, moba=None,
               learned_sinks=False, logits_soft_cap=None, moba_shared=False, *,
               rngs: nnx.Rngs):
    """moba: (block_size, top_k) to route each query block to its top-k key blocks (MoBA,
    `nn.MixtureOfBlockAttention`) instead of the window | sink mask; moba_shared: one selection
    per KV head, shared by its GQA group (NSA's group-centric selection). learned_sinks: a learned
    sink logit per head in every attention row (gpt-oss), beside the mask's sink tokens.
    logits_soft_cap: attention scores capped to c·tanh(s / c) (Gemma 2)."""
    mask = masks.causal() & (masks.sliding_window(window - 1) | masks.sink(sinks))
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.blocks = nnx.List([Block(dim, heads, kv_heads, mask, backend, rngs, attn_dtype,
                                  context_axis, moba, learned_sinks, logits_soft_cap,
                                  moba_shared)
                                  for _ in range(depth)])
    self.norm = nnx.RMSNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

  def __call__(self, tokens, segment_ids=None):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, segment_ids)
    return self.head(self.norm(x))


def synthetic_batches(batch, length, vocab=64, seed=0):
  """Each row packs two documents; each document repeats a random motif of 3-8 tokens."""
  rng = np.random.default_rng(seed)
  while True:
    tokens = np.zeros((batch, length + 1), np.int32)
    seg = np.zeros((batch, length + 1), np.int32)
    for b in range(batch):
      cut = rng.integers(length // 4, 3 * length // 4)
      for d, (lo, hi) in enumerate(((0, cut), (cut, length + 1))):
        motif = rng.integers(1, vocab, rng.integers(3, 9))
        tokens[b, lo:hi] = np.resize(motif, hi - lo)
        seg[b, lo:hi] = d
    yield jnp.asarray(tokens), jnp.asarray(seg)


def loss_fn(model, batch):
  tokens, seg = batch
  logits = model(tokens[:, :-1], seg[:, :-1])
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  same_doc = seg[:, 1:] == seg[:, :-1]
  return jnp.sum(xent * same_doc) / jnp.maximum(jnp.sum(same_doc), 1)


def main():
  run_cli(__doc__, dict(steps=200, batch=8, size=128, lr=3e-3, moba=None, moba_shared=False,
                        learned_sinks=False, logits_soft_cap=None),
          lambda a: CausalLM(backend=a.backend, context_axis=a.context_axis,
                             moba=tuple(a.moba) if a.moba else None,
                             moba_shared=a.moba_shared,
                             learned_sinks=a.learned_sinks,
                             logits_soft_cap=a.logits_soft_cap,
                             rngs=nnx.Rngs(a.seed)), loss_fn,
          lambda a: synthetic_batches(a.batch, a.size, seed=a.seed))


if __name__ == "__main__":
  main()
