"""The README's and the guide's Python snippets run as written.

The snippets are cheat sheets: `q, k, v` mean 1-D sequences in one line and a video in the
next. Each statement runs in one namespace per block (names the block assigns carry on, as
when a user pastes it) after `q`, `k`, `v` and their companions (`valid`, `doc_ids`, ...)
are set to small arrays of the layout the statement's call takes: `na2d` images,
`na3d` videos, `na_packed` packed grids, `na(..., tiling=t)` the tiling's token order, and
1-D sequences otherwise. `x = ...` in a snippet means "your arrays": it is not run. Every
array a line assigns is checked finite; a renamed argument, a changed signature or a shape
rule the docs break fails here, at the doc's line.
"""
import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sparse_attn as jsa
from jax_sparse_attn import context_parallel as cp
from jax_sparse_attn import dot_product_attention, masks, nn, routing

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/guide.md")
HEADS, DIM = 2, 16


def _blocks(path):
  """The file's ```python blocks, in order, each with the line it starts on."""
  blocks, cur = [], None
  for number, line in enumerate((ROOT / path).read_text().splitlines(), 1):
    if cur is None and line.strip() == "```python":
      cur, start = [], number + 1
    elif cur is not None and line.strip().startswith("```"):
      blocks.append((start, "\n".join(cur)))
      cur = None
    elif cur is not None:
      cur.append(line)
  return blocks


def _rand(key, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(key), shape, dtype)


def _qkv(shape):
  return {"q": _rand(0, shape), "k": _rand(1, shape), "v": _rand(2, shape)}


def _inputs(kind, ns):
  """q, k, v and the companions a statement of this kind reads."""
  if kind == "na2d":
    out = _qkv((1, 32, 32, HEADS, DIM))
    out["valid"] = jnp.ones((1, 32, 32), bool).at[:, :, 28:].set(False)
    return out
  if kind == "na3d":
    out = _qkv((2, 8, 16, 16, HEADS, DIM))
    out["valid"] = jnp.ones((2, 8, 16, 16), bool).at[:, 7].set(False)
    return out
  if kind == "na_packed":
    return _qkv((1, 64 * 64 + 48 * 80, HEADS, DIM // 2))
  if kind == "na_tiled":
    return _qkv((1, ns["t"].num_tokens, 1, 8))
  seq = 512
  out = _qkv((2, seq, HEADS, DIM))
  out["doc_ids"] = jnp.repeat(jnp.array([[0, 1, 1, 2]] * 2), seq // 4, axis=1)
  out["lens"] = jnp.array([seq, 300])
  return out


def _kind(node):
  names = {n.attr if isinstance(n, ast.Attribute) else n.id
           for n in ast.walk(node) if isinstance(n, (ast.Attribute, ast.Name))}
  if "na_packed" in names:
    return "na_packed"
  if "na3d" in names:
    return "na3d"
  if "na2d" in names or "NeighborhoodAttention2D" in names:
    return "na2d"
  if "na" in names and "tiling" in {k.arg for c in ast.walk(node) if isinstance(c, ast.Call)
                                    for k in c.keywords}:
    return "na_tiled"
  return "seq"


def _namespace():
  b, h, d = 1, HEADS, DIM
  ns = dict(jax=jax, jnp=jnp, np=np, jsa=jsa, masks=masks, routing=routing, nn=nn, cp=cp,
            dot_product_attention=dot_product_attention)
  ns.update(B=b, H=h, D=d,
            sink_logits=jnp.zeros((HEADS,)), gate_scores=_rand(3, (2, HEADS, 4, 4)),
            k_txt=_rand(4, (1, 8, HEADS, DIM)), v_txt=_rand(5, (1, 8, HEADS, DIM)),
            txt_valid=jnp.arange(8)[None] < 6,
            q_img=_rand(6, (b, 64, 64, h, d)), k_img=_rand(7, (b, 64, 64, h, d)),
            v_img=_rand(8, (b, 64, 64, h, d)), q_txt=_rand(9, (b, 512, h, d)))
  ns["tokens"] = np.arange(2 * 512).reshape(2, 512)
  for i, name in enumerate(("qz", "kz", "vz")):
    ns[name] = _rand(10 + i, (2, 512, HEADS, DIM))
  o = [_rand(13 + i, (2, 64, HEADS, DIM)) for i in range(2)]
  ns.update(o1=o[0], o2=o[1], lse1=_rand(15, (2, 64, HEADS)), lse2=_rand(16, (2, 64, HEADS)))
  ns["mesh"] = jax.make_mesh((2,), ("context",))
  return ns


# Per block: arrays whose shape the block's own lines fix (the Flax layer's features).
_OVERRIDES = {"nn.NeighborhoodAttention2D(512": {"x": lambda: _rand(17, (2, 16, 16, 512))},
              "jsa.na_tiling((128, 128)": {"x": lambda: _rand(17, (1, 128, 128, 4))}}


def _cases():
  for path in DOCS:
    for i, (start, block) in enumerate(_blocks(path)):
      yield pytest.param(path, start, block, id=f"{path}:{i + 1}")


def test_docs_have_snippets():
  assert len(list(_cases())) >= 10


@pytest.mark.parametrize("path,start,block", _cases())
def test_snippet_runs(path, start, block):
  ns = _namespace()
  for marker, arrays in _OVERRIDES.items():
    if marker in block:
      ns.update({name: make() for name, make in arrays.items()})
  assigned = set()
  ran = checked = 0
  tree = ast.increment_lineno(ast.parse(block), start - 1)  # tracebacks name the doc's line
  for stmt in tree.body:
    if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant) \
        and stmt.value.value is Ellipsis:
      continue  # "your arrays here"
    ns.update({k: v for k, v in _inputs(_kind(stmt), ns).items() if k not in assigned})
    code = compile(ast.Module([stmt], type_ignores=[]), path, "exec")
    exec(code, ns)  # noqa: S102
    ran += 1
    stored = {node.id for node in ast.walk(stmt)
              if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    assigned |= stored
    for name in stored:  # what the line computed: finite
      for leaf in jax.tree.leaves(ns[name]):
        if isinstance(leaf, (jax.Array, np.ndarray)):
          assert np.isfinite(np.asarray(leaf, np.float32)).all(), (path, stmt.lineno, name)
          checked += 1
  assert ran and checked
