"""The dQ kernel over window-anchored KV boxes (`attention_bwd.WINDOW_DQ`) against the same
kernel over the backward plan's map (the shifted key grid, `ops._backward_plan`), on the
strided 3-D neighborhood (16x64x64, k(8,16,16), stride (4,8,8), B=1, H=16, D=128 bf16) and
its GQA 16/4 form: gradients against float32 XLA at 16x32x32 (H=4), the variants' gradients
against each other at full size, and fwd / fwd+bwd ms interleaved over rounds.

    python -m benchmarks.diag.diag_window_dq --out x.json

``--routing``: neighborhoods that `auto` trains on the Triton backward (2-D strided and odd
kernels, a small 3-D stride) where the window boxes apply to the Hopper dQ: `auto` against
the Hopper backward with and without them (B=2, H=16, D=128; gradients of each Hopper
variant against `auto`'s at full size).

``--fused``: the strided cases' default backward (dK/dV kernel + dQ on window boxes) against
the fused form (dQ reduce-added by the dK/dV kernel on the shifted map,
``backward_dq="split"``), interleaved, gradients against each other.
"""
import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from pallas_kernels.gpu import MosaicGPUConfig
from pallas_kernels.gpu.mosaic_gpu import attention_bwd

from . import Rows, case_parser, interleaved, knob_setter, max_rel_diff
from ..bench_gpu import fwd_bwd, inputs, rel_errors

KERNEL, STRIDE = (8, 16, 16), (4, 8, 8)
CASES = {"strided": 16, "strided_gqa": 4}  # name: kv heads (H=16)


def _inputs(spatial, heads, kv_heads, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, do = (jax.random.normal(x, (1, *spatial, heads, 128), dtype) for x in ks[:2])
  k, v = (jax.random.normal(x, (1, *spatial, kv_heads, 128), dtype) for x in ks[2:])
  return q, k, v, do


# name: (spatial, kernel, stride, batch)
ROUTING = {"na2d_k16_s8": ((128, 128), 16, 8, 2), "na2d_k32_s16": ((128, 128), 32, 16, 2),
           "na2d_k13": ((128, 128), 13, 1, 2),
           "na3d_k4x8x8_s2x4x4": ((16, 64, 64), (4, 8, 8), (2, 4, 4), 1)}


def routing(names: str, rows: Rows, out):
  setter = knob_setter(attention_bwd, "WINDOW_DQ")
  hopper = MosaicGPUConfig(backward="mosaic_gpu")
  for name in names.split(","):
    spatial, kern, stride, b = ROUTING[name]
    fn = lambda cfg: (lambda q, k, v: jsa.na(q, k, v, kern, stride, backend="mosaic_gpu",
                                             config=cfg))
    big = inputs((b, *spatial, 16, 128), (b, *spatial, 16, 128), jnp.bfloat16)
    variants = {"auto": lambda: (setter(True), fn(None))[1],
                "hopper_window": lambda: (setter(True), fn(hopper))[1],
                "hopper_map": lambda: (setter(False), fn(hopper))[1]}
    row = {"case": name}
    grads = interleaved(row, variants, big, rounds=2)
    for v in ("hopper_window", "hopper_map"):
      row[f"{v}_vs_auto_rel_diff"] = max_rel_diff(grads[v], grads["auto"])
    setter(True)
    rows.record(**row)
    rows.write(out)


def fused(names: str, rows: Rows, out):
  run = lambda cfg: (lambda q, k, v: jsa.na3d(q, k, v, KERNEL, stride=STRIDE,
                                               backend="mosaic_gpu", config=cfg))
  for name in names.split(","):
    big = _inputs((16, 64, 64), 16, CASES[name], jnp.bfloat16)
    row = {"case": name, "heads": f"16/{CASES[name]}"}
    grads = interleaved(row, {"default": lambda: run(None),
                              "fused": lambda: run(MosaicGPUConfig(backward_dq="split"))},
                        big, rounds=2)
    row["fused_vs_default_rel_diff"] = max_rel_diff(grads["fused"], grads["default"])
    rows.record(**row)
    rows.write(out)


def main():
  parser = case_parser(",".join(CASES))
  parser.add_argument("--routing", default=None, help="cases of ROUTING, comma-separated")
  parser.add_argument("--fused", action="store_true")
  args = parser.parse_args()
  rows = Rows()
  if args.routing:
    return routing(args.routing, rows, args.out)
  if args.fused:
    return fused(args.cases, rows, args.out)
  setter = knob_setter(attention_bwd, "WINDOW_DQ")
  run = lambda backend="mosaic_gpu": (lambda q, k, v: jsa.na3d(q, k, v, KERNEL, stride=STRIDE,
                                                                backend=backend))
  for name in args.cases.split(","):
    hkv = CASES[name]
    row = {"case": name, "heads": f"16/{hkv}"}
    small = _inputs((16, 32, 32), 4, 4 * hkv // 16, jnp.bfloat16, seed=1)
    want = fwd_bwd(run("xla"))(*(x.astype(jnp.float32) for x in small))
    for on in (True, False):
      setter(on)
      got = fwd_bwd(run())(*small)
      row[f"window_{on}_rel_err_vs_xla_f32"] = rel_errors(got, want, digits=5)
    big = _inputs((16, 64, 64), 16, hkv, jnp.bfloat16)
    variants = {"window": lambda: (setter(True), run())[1],
                "map": lambda: (setter(False), run())[1]}
    grads = interleaved(row, variants, big, rounds=3)
    row["window_vs_map_rel_diff"] = max_rel_diff(grads["window"], grads["map"])
    setter(True)
    rows.record(**row)
    rows.write(args.out)


if __name__ == "__main__":
  main()
