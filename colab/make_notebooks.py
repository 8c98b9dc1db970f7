"""Writes the Colab notebooks (the .ipynb files are generated from the cells below; edit here,
then `python colab/make_notebooks.py`). CI executes every notebook on CPU
(tests/test_notebooks.py): sizes shrink when the runtime has no accelerator."""
import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = "https://github.com/jax-sparse-attn/jax-sparse-attn"
HERE = os.path.dirname(os.path.abspath(__file__))

INSTALL = f'''# Install the package from the repository (skipped where it is already importable).
import importlib.util, subprocess, sys
if importlib.util.find_spec("jax_sparse_attn") is None:
  subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                  "git+{REPO}"], check=True)'''


def quickstart():
  return [
      new_markdown_cell("# jax-sparse-attn: quickstart\n\nNeighborhood attention in 1, 2 and "
                        "3 dimensions, masks, a mask and its block map, checks against the "
                        "reference, and the simulator. Runs on any runtime (CPU, GPU, TPU)."),
      new_code_cell(INSTALL),
      new_code_cell('''import jax, jax.numpy as jnp, numpy as np
import jax_sparse_attn as jsa
from jax_sparse_attn import masks
platform = jax.default_backend()
small = platform == "cpu"          # a CPU runtime (and CI) runs small sizes
dtype = jnp.float32 if small else jnp.bfloat16
print(platform, jax.devices()[0].device_kind, "->", jsa.resolve_backend("auto", masks.causal(),
      dtype=dtype, head_dim=64))'''),
      new_markdown_cell("## Neighborhood attention, 1-D / 2-D / 3-D\nLayout `[batch, *spatial, "
                        "heads, head_dim]`, NATTEN's semantics (kernel, stride, dilation, "
                        "per-dim causal). Each is checked against the dense reference, "
                        "forward and gradients."),
      new_code_cell('''def rand(shape, seed):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)

def check(run, ref, shape):
  q, k, v = (rand(shape, i) for i in range(3))
  loss = lambda f: (lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2))
  got, want = run(q, k, v), ref(q, k, v)
  g, w = (jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v) for f in (run, ref))
  rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) /
                           jnp.linalg.norm(b.astype(jnp.float32)))
  errs = [rel(got, want)] + [rel(a, b) for a, b in zip(g, w)]
  print("out, dq, dk, dv relative errors:", ["%.1e" % e for e in errs])
  assert max(errs) < (1e-4 if dtype == jnp.float32 else 2e-2)

side = 16 if small else 64
check(lambda q, k, v: jsa.na1d(q, k, v, 7, dilation=2),
      lambda q, k, v: jsa.na1d(q, k, v, 7, dilation=2, backend="reference"), (1, 4 * side, 2, 32))
check(lambda q, k, v: jsa.na2d(q, k, v, 5, stride=2),
      lambda q, k, v: jsa.na2d(q, k, v, 5, stride=2, backend="reference"), (1, side, side, 2, 32))
check(lambda q, k, v: jsa.na3d(q, k, v, (2, 5, 5), is_causal=(True, False, False)),
      lambda q, k, v: jsa.na3d(q, k, v, (2, 5, 5), is_causal=(True, False, False),
                               backend="reference"), (1, 4, side // 2, side // 2, 2, 32))'''),
      new_markdown_cell("## Masks compose\nIntervals (causal, windows, sinks, neighborhoods) "
                        "and any jnp function; segment ids for packed documents."),
      new_code_cell('''s = 256
lm = masks.causal() & (masks.sliding_window(31) | masks.sink(4))
q, k, v = (rand((1, s, 4, 32), i) for i in range(3))
seg = jnp.asarray(np.repeat([0, 1], s // 2)[None], jnp.int32)
out = jsa.attention(q, k, v, lm, segment_ids=seg)
ref = jsa.attention(q, k, v, lm, segment_ids=seg, backend="reference")
print("LM mask (window 32 | 4 sinks, two documents): max |diff|",
      float(jnp.max(jnp.abs(out - ref))))
# On the kernel backends the documents shape the block map: block pairs of different
# documents are skipped (here the sink block for the second document's queries).
from jax_sparse_attn import block_map
from jax_sparse_attn.layout import SequenceLayout
from jax_sparse_attn.plan import make_plan
static = make_plan(lm, SequenceLayout(s, 32), SequenceLayout(s, 32)).block_map
docs = block_map.from_segments(seg, seg, static)
print("blocks visited: the mask's map", static.num_visited, "| with the documents",
      int(docs.kv_counts.sum()))'''),
      new_markdown_cell("## Coming from `jax.nn.dot_product_attention`\n"
                        "`jsa.dot_product_attention` takes jax's arguments: `is_causal` and "
                        "`local_window_size` become block-sparse masks (skipped blocks are "
                        "never computed), the sequence lengths segment ids. Flax's own "
                        "attention modules take `attention_fn=jax_sparse_attn.nn.attention_fn(mask)`."),
      new_code_cell('''kw = dict(is_causal=True, local_window_size=(63, 0),
          query_seq_lengths=jnp.array([s - 16]))
ours = jsa.dot_product_attention(q, k, v, **kw)
theirs = jax.nn.dot_product_attention(q, k, v, **kw)
diff = float(jnp.max(jnp.abs(ours.astype(jnp.float32) - theirs.astype(jnp.float32))))
print("jsa.dot_product_attention vs jax.nn.dot_product_attention: max |diff|", diff)
assert diff < (1e-4 if dtype == jnp.float32 else 3e-2)'''),
      new_markdown_cell("## A mask and its block map\nLeft: which keys each query sees. Right: "
                        "the blocks a kernel visits (full blocks run with no mask work, "
                        "partial ones test the mask)."),
      new_code_cell('''import matplotlib.pyplot as plt
from jax_sparse_attn.layout import SequenceLayout
from jax_sparse_attn.plan import make_plan
idx = np.arange(s)
dense = np.asarray(lm(idx[:, None], idx[None, :]))
classes = make_plan(lm, SequenceLayout(s, 32), SequenceLayout(s, 32)).block_map.dense_classes()
fig, ax = plt.subplots(1, 2, figsize=(9, 4))
ax[0].imshow(dense, cmap="Greys"); ax[0].set_title("mask (query x key)")
ax[1].imshow(classes, cmap="viridis"); ax[1].set_title("block map: 0 skip, 1 partial, 2 full")
plt.show()'''),
      new_markdown_cell("## The simulator\nHow sparse a neighborhood is, and the speedup over "
                        "dense attention that its blocks allow."),
      new_code_cell('''print(jsa.simulate((128, 128), 33))
print(jsa.simulate((16, 64, 64), (8, 16, 16), stride=(4, 8, 8)))'''),
  ]


def train_nat():
  return [
      new_markdown_cell("# Train a NAT classifier\n`models.nat_classifier` (2-D neighborhood "
                        "attention, DiNAT-style dilation) with optax, on the runtime's device: "
                        "on a TPU the Pallas Mosaic kernels, on a GPU the Pallas GPU kernels. "
                        "The same model with dense attention trains beside it."),
      new_code_cell(INSTALL),
      new_code_cell('''import time
import jax, jax.numpy as jnp
from flax import nnx
from models import nat_classifier
from models.train import train
small = jax.default_backend() == "cpu"
size, steps, batch = (32, 15, 8) if small else (128, 300, 32)
print(jax.default_backend(), "image", size, "steps", steps)'''),
      new_code_cell('''results = {}
for backend in ("auto", "dense"):
  model = nat_classifier.NATClassifier(image_size=size, kernel=7 if small else 13,
                                       backend=backend, rngs=nnx.Rngs(0))
  t = time.perf_counter()
  losses = train(model, nat_classifier.loss_fn, nat_classifier.synthetic_batches(batch, size),
                 steps, lr=3e-3, log_every=max(1, steps // 5))
  results[backend] = (losses, time.perf_counter() - t)
  print(backend, "final loss %.3f, %.1f s" % (losses[-1], results[backend][1]))
assert results["auto"][0][-1] < results["auto"][0][0]     # it learns'''),
      new_code_cell('''import matplotlib.pyplot as plt
for backend, (losses, secs) in results.items():
  plt.plot(losses, label=f"{backend} ({secs:.0f} s)")
plt.xlabel("step"); plt.ylabel("loss"); plt.legend(); plt.show()'''),
  ]


def sharded():
  return [
      new_markdown_cell("# Sharded attention over all cores\nContext parallelism (the sequence "
                        "sharded over a mesh axis: ring for causal attention, halo exchange for "
                        "neighborhoods, all-gather for content-routed blocks) and batch/head "
                        "sharding, with JAX's own `Mesh`, "
                        "`shard_map` and collectives. On a CPU runtime the notebook makes 8 "
                        "host devices."),
      new_code_cell('''import os
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # CPU only'''),
      new_code_cell(INSTALL),
      new_code_cell('''import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import jax_sparse_attn as jsa
from jax_sparse_attn import masks, context_parallel as cp
n = jax.device_count()
small = jax.default_backend() == "cpu"
dtype = jnp.float32 if small else jnp.bfloat16
mesh = jax.make_mesh((n,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
print(n, "devices:", jax.devices()[0].device_kind)
rand = lambda shape, seed: jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)
rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) /
                         jnp.linalg.norm(b.astype(jnp.float32)))'''),
      new_markdown_cell("## Causal attention on a ring\nEach device holds a slab of the "
                        "sequence; K/V shards travel around the ring (`ppermute`), steps with "
                        "nothing to do are skipped. Gradients equal the single-device ones."),
      new_code_cell('''s = 128 * n if small else 4096 * n
q, k, v = (rand((1, s, 4, 64), i) for i in range(3))
place = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, "context")))
ring = lambda q, k, v: jsa.attention(q, k, v, masks.causal(), mesh=mesh, context_axis="context",
                                     strategy="ring")
one = lambda q, k, v: jsa.attention(q, k, v, masks.causal())
loss = lambda f: (lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2))
got = jax.jit(jax.value_and_grad(loss(ring), argnums=(0, 1, 2)))(*map(place, (q, k, v)))
want = jax.value_and_grad(loss(one), argnums=(0, 1, 2))(q, k, v)
print("loss", float(got[0]), float(want[0]), "dq/dk/dv rel. errors",
      ["%.1e" % rel(a, b) for a, b in zip(got[1], want[1])])
print(cp.plan_context(masks.causal(), s, s, n, 128, 128, "ring").table)'''),
      new_markdown_cell("## A video latent: 3-D neighborhoods with a halo exchange\nFrames are "
                        "sharded; each device receives only the neighbouring frames its windows "
                        "reach. The compiled program has collective-permutes and no all-gather."),
      new_code_cell('''frames = 2 * n
shape = (1, frames, 16, 16, 2, 32) if small else (1, frames, 64, 64, 8, 128)
q, k, v = (rand(shape, i + 3) for i in range(3))
halo = jax.jit(lambda q, k, v: jsa.na3d(q, k, v, (3, 5, 5), mesh=mesh, context_axis="context"))
print("rel. error vs one device:", rel(halo(*map(place, (q, k, v))), jsa.na3d(q, k, v, (3, 5, 5))))
hlo = halo.lower(*map(place, (q, k, v))).compile().as_text()
print("collective-permutes:", hlo.count("collective-permute-start") or hlo.count("collective-permute"),
      "all-gathers:", hlo.count("all-gather"))'''),
      new_markdown_cell("## Padded frames\nA padding mask (`kv_valid`) or packed clips "
                        "(`segment_ids`) on the sharded latent: the keys' ids travel with their "
                        "halos, so padded keys are never attended on any device."),
      new_code_cell('''valid = jnp.ones(shape[:4], bool).at[:, :, :, -4:].set(False)  # 4 padded cols
padded = jax.jit(lambda q, k, v: jsa.na3d(q, k, v, (3, 5, 5), kv_valid=valid, mesh=mesh,
                                          context_axis="context"))
print("rel. error vs one device:", rel(padded(*map(place, (q, k, v))),
                                       jsa.na3d(q, k, v, (3, 5, 5), kv_valid=valid)))'''),
      new_markdown_cell("## MoBA with the sequence sharded\nContent-routed blocks: the "
                        "selection (`routing.topk_blocks`) partitions with the sharded q and k; "
                        "each device gathers K/V and runs its own query blocks' rows."),
      new_code_cell('''from jax_sparse_attn import routing
bs = 16 if small else 128
q, k, v = (rand((1, s, 4, 64), i + 10) for i in range(3))
def moba(q, k, v, mesh=None):
  sel = routing.topk_blocks(q, k, bs, 4, causal=True, local_blocks=1)
  return jsa.attention(q, k, v, masks.causal(), block_selection=sel, mesh=mesh,
                       context_axis="context" if mesh else None)
got = jax.jit(lambda *a: moba(*a, mesh=mesh))(*map(place, (q, k, v)))
print("rel. error vs one device:", rel(got, moba(q, k, v)))'''),
      new_markdown_cell("## Batch and head sharding\nWith q/k/v sharded over `data` (batch) "
                        "and `model` (heads) the op runs per shard, with no all-gather."),
      new_code_cell('''mesh2 = jax.make_mesh((2, n // 2), ("data", "model"),
                      axis_types=(jax.sharding.AxisType.Auto,) * 2)
x = rand((2, 16, 16, n, 32), 7)
xs = jax.device_put(x, NamedSharding(mesh2, P("data", None, None, "model")))
f = jax.jit(lambda q: jsa.na2d(q, q, q, 5, mesh=mesh2))
print("rel. error:", rel(f(xs), jsa.na2d(x, x, x, 5)), "| all-gathers in HLO:",
      f.lower(xs).compile().as_text().count("all-gather"))'''),
  ]


def main():
  for name, cells in (("01_quickstart", quickstart()), ("02_train_nat", train_nat()),
                      ("03_sharded", sharded())):
    for i, cell in enumerate(cells):
      cell["id"] = f"{name[:2]}-{i:02d}"  # stable ids: regenerating changes only what changed
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "accelerator": "TPU", "colab": {"provenance": []}})
    nbformat.write(nb, os.path.join(HERE, name + ".ipynb"))


if __name__ == "__main__":
  main()
