"""Shared training loop: optax AdamW with linear warmup + cosine decay, NNX models.

State is `nnx.state(model)` / `nnx.state(optimizer)`: plain pytrees, so orbax's
`StandardCheckpointer` saves and restores them (`--checkpoint DIR` does it when orbax is
installed; it is not a dependency).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import time
from typing import Callable, Iterator

import jax
import optax
from flax import nnx


def make_optimizer(model, steps: int, lr: float = 1e-3, warmup: int | None = None,
                   weight_decay: float = 0.05):
  warmup = max(1, steps // 10) if warmup is None else warmup
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1),
                                                end_value=lr * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def compiled_step(model, optimizer, loss_fn: Callable):
  """A jitted functional training step and its state: `step(state, batch) -> (loss, state)`
  over `state = nnx.state((model, optimizer))` (donated), so the Python object graph is walked
  once here instead of on every call as `nnx.jit` does (milliseconds per step on deep models).
  Write the state back with `nnx.update((model, optimizer), state)`."""
  graphdef, state = nnx.split((model, optimizer))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss, nnx.state((model, optimizer))

  return step, state


def train(model, loss_fn: Callable, batches: Iterator, steps: int, lr: float = 1e-3,
          log_every: int = 10, checkpoint: str | None = None, verbose: bool = True):
  """Runs `steps` AdamW steps of `loss_fn(model, batch) -> scalar`. Returns the loss history."""
  optimizer = make_optimizer(model, steps, lr)
  step, state = compiled_step(model, optimizer, loss_fn)
  losses = []
  t0 = time.perf_counter()
  for i in range(steps):
    loss, state = step(state, next(batches))
    losses.append(loss)
    if verbose and (i % log_every == 0 or i == steps - 1):
      print(f"step {i:5d}  loss {float(loss):.4f}  ({time.perf_counter() - t0:.1f}s)", flush=True)
  nnx.update((model, optimizer), state)
  losses = [float(x) for x in losses]
  if checkpoint:
    save(checkpoint, model)
  return losses


def save(path: str, model) -> None:
  import orbax.checkpoint as ocp  # optional
  ocp.StandardCheckpointer().save(path, nnx.state(model))


def cli(description: str, defaults: dict) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--steps", type=int, default=defaults.get("steps", 100))
  parser.add_argument("--batch", type=int, default=defaults.get("batch", 8))
  parser.add_argument("--size", type=int, default=defaults.get("size", 32),
                      help="spatial side / sequence length")
  parser.add_argument("--lr", type=float, default=defaults.get("lr", 1e-3))
  parser.add_argument("--backend", default="auto",
                      help='attention backend, or "dense" for the jax.nn.dot_product_attention baseline')
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--checkpoint", default=None, help="save the final state here (orbax)")
  parser.add_argument("--context-parallel", type=int, default=1, metavar="N",
                      help="shard the sequence (video: frames) over N devices (context "
                           "parallelism; data parallel over the rest)")
  if "frames" in defaults:
    parser.add_argument("--frames", type=int, default=defaults["frames"])
  if "moba" in defaults:
    parser.add_argument("--moba", type=int, nargs=2, default=defaults["moba"],
                        metavar=("BLOCK", "TOP_K"), help="MoBA routing instead of the mask")
  if "moba_shared" in defaults:
    parser.add_argument("--moba-shared", action="store_true",
                        help="with --moba: one selection per KV head, shared by its GQA group")
  if "learned_sinks" in defaults:
    parser.add_argument("--learned-sinks", action="store_true",
                        help="a learned sink logit per head (gpt-oss attention sinks)")
  if "logits_soft_cap" in defaults:
    parser.add_argument("--logits-soft-cap", type=float, default=defaults["logits_soft_cap"],
                        metavar="C", help="attention scores capped to C·tanh(s / C) (Gemma 2: 50)")
  args = parser.parse_args()
  args.context_axis = "context" if args.context_parallel > 1 else None
  return args


def context_mesh(context_parallel: int):
  """A ("data", "context") mesh over every device, `context_parallel` of them on the context
  axis (`jax_sparse_attn.nn.DEFAULT_RULES` maps activations' "length" to it)."""
  devices = jax.device_count()
  if context_parallel < 1 or devices % context_parallel:
    raise ValueError(f"--context-parallel {context_parallel} must divide the device count "
                     f"({devices})")
  return jax.make_mesh((devices // context_parallel, context_parallel), ("data", "context"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def run_cli(doc: str, defaults: dict, make_model, loss_fn, make_batches) -> None:
  """The models' shared entry point: parse the CLI, build, train, print the loss change."""
  args = cli(doc.split("\n\n")[0], defaults)
  mesh = context_mesh(args.context_parallel) if args.context_parallel > 1 else None
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    model = make_model(args)
    losses = train(model, loss_fn, make_batches(args), args.steps, args.lr,
                   checkpoint=args.checkpoint)
  print(f"loss {sum(losses[:5]) / 5:.3f} -> {sum(losses[-5:]) / 5:.3f}")


def mlp(rngs, dim, hidden):
  return nnx.Sequential(nnx.Linear(dim, hidden, rngs=rngs), nnx.gelu,
                        nnx.Linear(hidden, dim, rngs=rngs))
