"""The backend contract and registry (tokamax style): one op, several implementations.

Every backend implements pure functions on kernel-order arrays,
``forward(q, k, v, q_seg, kv_seg, plan, scale, config, interpret) -> (out, lse)`` and
``backward(..., out, lse, d_out, d_lse, plan, scale, config, interpret) -> (dq, dk, dv)``,
and registers itself with `register_backend`. `ops` looks backends up here; the Pallas
kernel packages (`pallas_kernels.gpu`, `pallas_kernels.tpu`) import this module, never
`ops`, and are imported only when their backend is first used, so `import jax_sparse_attn`
loads no Pallas code.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, NamedTuple

import jax

from . import masks as masks_lib

BACKENDS = ("auto", "reference", "xla", "triton", "mosaic", "mosaic_gpu")
# What each kernel backend runs on, outside interpret mode (`check_available`).
_NEEDS = {"triton": ("gpu", "an NVIDIA GPU"), "mosaic_gpu": ("gpu", "an NVIDIA Hopper GPU (sm90)"),
          "mosaic": ("tpu", "a TPU")}
_TARGET: list[str] = []  # platforms of `target` contexts (export for a device not present)


class Backend(NamedTuple):
  """A registered implementation: pure functions on kernel-order arrays."""
  forward: Callable
  backward: Callable
  default_blocks: Callable[[int, Any], tuple[int, int]]  # (head_dim, dtype) -> (bq, bk)
  min_block: int = 16  # small sequences shrink the default blocks down to this
  # Takes `plan_lib.gathered` plans: neighborhood attention hands it q/k/v in the caller's
  # order (no permuted copies); the kernels gather rows.
  gathers: bool = False
  # (head_dim, dtype, config, mask, segments: the call has a padding mask or segment ids) ->
  # map blocks for the backward kernels of gathered plans (whose token order does not depend
  # on the tiling: the backward may tile differently from the forward), or None: the
  # forward's. (Called through `backward_map_blocks`: a four-parameter callable, without
  # ``segments``, still works.)
  backward_blocks: Callable[[int, Any, Any, Any, bool], tuple[int, int] | None] | None = None
  # Neighborhood tile choice: also consider query tiles of half the default block (when no
  # block_q is given), and prefer tiles whose last dim is a multiple of this.
  half_q_tiles: bool = False
  tile_last_multiple: int = 1
  # (mask, block_q, block_kv, segments) -> (q tile, kv tile): the backend's own tile choice
  # for `na`'s defaults (``segments``: the call has a padding mask or segment ids; None: the
  # simulator's `best_tile_shapes` with the fields above).
  choose_tiles: Callable | None = None
  # (mask, block_q, block_kv) -> (q tile, kv tile) of the backward's plan (`backward_blocks`'
  # blocks; None: the simulator's `best_tile_shapes`). Not for shards of a context-parallel
  # plan, which fit the simulator's tiles to the shard.
  choose_backward_tiles: Callable | None = None
  # (mask, forward tiles, backward tiles, segments) -> whether `na` runs the forward on the
  # backward's tiles where they differ (one plan for both passes; ``segments``: the call has
  # a padding mask or segment ids), or None: never.
  shares_backward_tiles: Callable | None = None
  # (plan, head_dim) -> whether the backward runs on the forward's plan, or None: always.
  # Where it does not (blocks of tiles the caller chose), `na` gives it a plan of its own.
  backward_runs: Callable | None = None
  # Takes runtime block maps (`block_map.from_selection`: content-routed attention) as
  # forward(..., block_map=) / backward(..., block_map=).
  runtime_maps: bool = False
  # Takes the runtime maps of segment ids (`block_map.from_segments`: rows shared by every
  # head, full blocks with no segment test), where they skip work (not the XLA scan, which
  # walks the static map's width either way).
  segment_maps: bool = False
  # (row width, rows per block) -> whether a runtime map's block fits the kernels (the TPU
  # kernels scalar-prefetch it), or None: any does.
  runtime_map_fits: Callable[[int, int], bool] | None = None
  # Takes learned sink logits as forward(..., sinks=[heads] float32), joined to every row's
  # softmax in the epilogue (`merge.join_sink`: the output scaled, the lse with the sink):
  # no pass over the output after the kernel. Its backward is then called with
  # ``out=None`` and ``d_lse`` already holding ``d_lse - rowsum(dO ∘ O)`` (`backward_delta`):
  # `ops` takes that rowsum once for the sinks' gradient and the kernels (its lse holds the
  # sink: nothing else changes).
  sinks: bool = False
  # Takes logit soft-capping as forward(..., softcap=cap) and backward(..., softcap=cap)
  # (a Python float; `softcap.capped`): scores capped before the mask. Backends without it
  # raise ValueError for ``logits_soft_cap``.
  softcap: bool = False


def backward_delta(out, d_out, d_lse):
  """The backward's per-row term ``rowsum(dO ∘ O) - dLSE`` [batch, heads, n] in float32
  (out, d_out [batch, n, heads, d]). ``out=None``: the caller already folded the rowsum into
  ``d_lse`` (`Backend.sinks`)."""
  f32 = jax.numpy.float32
  if out is None:
    return -d_lse.astype(f32)
  rowsum = jax.numpy.sum(d_out.astype(f32) * out.astype(f32), axis=-1)  # one fused pass
  return rowsum.transpose(0, 2, 1) - d_lse.astype(f32)


def _xla_forward(q, k, v, q_seg, kv_seg, plan, scale, config, interpret, block_map=None,
                 sinks=None, softcap=None):
  from . import xla_backend
  del config, interpret
  return xla_backend.forward(q, k, v, q_seg, kv_seg, plan, scale, block_map, sinks, softcap)


def _xla_backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, plan, scale, config, interpret,
                  block_map=None, softcap=None):
  from . import xla_backend
  del config, interpret
  return xla_backend.backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, plan, scale,
                              block_map, softcap)


_REGISTRY: dict[str, Backend] = {
    "xla": Backend(_xla_forward, _xla_backward, lambda d, dt: (64, 64), runtime_maps=True,
                   sinks=True, softcap=True),
}


def backward_map_blocks(impl: Backend, head_dim: int, dtype, config, mask, segments: bool):
  """`impl.backward_blocks`' answer (None where it has none). A callable of four parameters
  (written before the fifth, ``segments``) is called without it."""
  fn = impl.backward_blocks
  if fn is None:
    return None
  if _takes_segments(fn):
    return fn(head_dim, dtype, config, mask, segments)
  return fn(head_dim, dtype, config, mask)


def _takes_segments(fn) -> bool:
  try:
    params = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):  # no signature to read: pass it
    return True
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  return len(positional) >= 5 or any(p.kind == p.VAR_POSITIONAL for p in params)


def register_backend(name: str, backend: Backend) -> None:
  _REGISTRY[name] = backend


def get_backend(name: str) -> Backend:
  if name not in _REGISTRY:
    # Kernel backends register themselves on import.
    if name in ("triton", "mosaic_gpu"):
      import pallas_kernels.gpu  # noqa: F401
    elif name == "mosaic":
      import pallas_kernels.tpu  # noqa: F401
    if name not in _REGISTRY:
      raise ValueError(f"backend={name!r} is not available in this installation")
  return _REGISTRY[name]


@contextlib.contextmanager
def target(platform: str):
  """Trace for `platform` ("gpu" or "tpu") on a machine without it: `jax.export` of the
  kernels for a device that is not present (`pallas_kernels.gpu.export_for_gpu`,
  `pallas_kernels.tpu.export_for_tpu`); `check_available` then accepts its backends."""
  _TARGET.append(platform)
  try:
    yield
  finally:
    _TARGET.pop()


def check_available(name: str, interpret) -> None:
  """ValueError when kernel backend `name` cannot run here: `triton` needs an NVIDIA GPU,
  `mosaic_gpu` a Hopper GPU, `mosaic` a TPU, unless in interpret mode (or under `target`);
  `triton` also needs jax's Pallas Triton lowering (`triton_attention.available`), in
  interpret mode too."""
  if name == "triton":
    from pallas_kernels.gpu import triton_attention
    triton_attention.check_available()
  if name not in _NEEDS or interpret:
    return
  platform, what = _NEEDS[name]
  here = _TARGET[-1] if _TARGET else jax.default_backend()
  if here != platform:
    raise ValueError(
        f"backend={name!r} runs on {what}, and this machine's default device is {here!r}: "
        f"use backend='auto' (it picks what the device runs) or 'xla', or pass "
        f"interpret=True to run the Pallas kernel in interpret mode (slow; for tests)")
  if name == "mosaic_gpu" and not _TARGET:
    from pallas_kernels.gpu import mosaic_gpu as mg
    if not mg.is_hopper():
      raise ValueError(f"backend='mosaic_gpu' runs on {what}, this GPU is "
                       f"{jax.devices()[0].device_kind!r}: use backend='triton' or 'auto'")


def resolve_backend(backend: str, mask: masks_lib.Mask | None = None, *, dtype=None,
                    head_dim: int | None = None, segments: bool = False, block_q=None,
                    block_kv=None, config=None, scale=None) -> str:
  """The backend `backend="auto"` runs: on Hopper GPUs "mosaic_gpu" where it supports the
  call (`pallas_kernels.gpu.mosaic_gpu.supports`: bf16/f16, head_dim <= 256, its
  block sizes and config; any mask but arrays with rows of more than 4 runs, segment ids
  too), other GPUs and the rest "triton" (where jax has the Triton lowering,
  `triton_attention.available`; else "xla"); "mosaic" on TPU; "xla" elsewhere and for the
  array masks a backend cannot take (`has_array_mask`)."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend != "auto":
    return backend
  platform = jax.default_backend()
  has_array = mask is not None and has_array_mask(mask)
  if platform == "gpu":
    from pallas_kernels.gpu import mosaic_gpu as mg
    if (dtype is not None and head_dim is not None and mg.is_hopper() and not has_array
        and mg.supports(mask, dtype, head_dim, segments, block_q, block_kv, config, scale)):
      return "mosaic_gpu"
    if has_array:
      return "xla"
    from pallas_kernels.gpu import triton_attention
    return "triton" if triton_attention.available() else "xla"
  if platform == "tpu" and not has_array:
    return "mosaic"
  return "xla"


def has_array_mask(mask, routed: bool = False) -> bool:
  """Whether `mask` holds an explicit array that the kernel backends cannot take, so it runs
  on `xla` (unsharded): a `masks.from_array` array with rows of more than `masks.MAX_TERMS`
  runs, or row bounds (`masks.RowBounds`) inside ``|`` or beside a mask function, which a
  kernel would trace as a mask function (which cannot hold the array), unless the mask is a
  union of at most `masks.MAX_TERMS` interval terms: every kernel backend tests those as
  intervals per term (the Hopper kernels' own union test; Triton and TPU through
  `plan.intervals_per_term`), forward, backward and sharded. `routed`: for content-routed
  maps (`block_selection`), which take no such unions either."""
  terms = list(masks_lib.array_terms(mask))
  if any(isinstance(term, masks_lib.FromArray) for term, _ in terms):
    return True
  if not any(elementwise for _, elementwise in terms):
    return False
  return routed or masks_lib.interval_terms(mask) is None
