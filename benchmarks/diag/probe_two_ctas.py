"""Can two warp-specialised Mosaic GPU CTAs share an SM? The question before a dK/dV kernel of
one compute warpgroup (64 keys) run two CTAs per SM (docs/performance.md, "Next for short
windows without Triton"). A CTA of ``threads`` warpgroups spins ``iters`` float32 steps in
each warpgroup but the last; with ``regs`` the last lowers its registers and the others raise
theirs (`plgpu.set_max_registers`, as the backward kernels do). Per variant: ptxas' register
count (`MOSAIC_GPU_DUMP_PTXAS`, in a child process) and the kernel's ms at 1, 2 and 4 CTAs per
SM of the card: where two CTAs are resident at once, 2 per SM takes about the time of 1.

    python -m benchmarks.diag.probe_two_ctas --out DIR
"""
import json
import os

from . import child_done, run_variant, variant_parser

# name: (warpgroups, (compute, memory) registers or None: no set_max_registers)
VARIANTS = {"wg3_setmaxnreg": (3, (232, 40)),
            "wg2_setmaxnreg": (2, (216, 40)),
            "wg2_plain": (2, None)}
ITERS = 200_000


def spin_kernel(threads: int, regs, ctas: int, iters: int = ITERS, interpret: bool = False):
  """f() -> [ctas, threads - 1] float32: each compute warpgroup's spin result."""
  import jax
  import jax.numpy as jnp
  from jax import lax
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from pallas_kernels.gpu.mosaic_gpu.config import interpret_params

  def body(o_ref):
    pl.run_scoped(lambda smem: per_warpgroup(o_ref, smem),
                  plgpu.SMEM((threads - 1, 128), jnp.float32), collective_axes="wg")

  def per_warpgroup(o_ref, smem):
    wg, cta = lax.axis_index("wg"), lax.axis_index("cta")

    @pl.when(wg == threads - 1)
    def _memory():
      if regs is not None:
        plgpu.set_max_registers(regs[1], action="decrease")

    @pl.when(wg < threads - 1)
    def _compute():
      if regs is not None:
        plgpu.set_max_registers(regs[0], action="increase")
      a = lax.fori_loop(0, iters, lambda i, a: a * 0.999999 + 1.0, cta.astype(jnp.float32))
      smem.at[wg][...] = jnp.full((128,), a, jnp.float32)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(smem.at[wg], o_ref.at[cta, wg])
      plgpu.wait_smem_to_gmem(0)

  mesh = plgpu.Mesh(grid=(ctas,), grid_names=("cta",), num_threads=threads, thread_name="wg")
  kernel = pl.kernel(body, out_type=jax.ShapeDtypeStruct((ctas, threads - 1, 128), jnp.float32),
                     mesh=mesh,
                     interpret=interpret_params(interpret))
  return jax.jit(kernel)


def child(name: str, out: str):
  import jax
  from jax_sparse_attn.demo import time_ms
  threads, regs = VARIANTS[name]
  sms = jax.devices()[0].core_count
  row = {"variant": name, "sms": sms, "device": jax.devices()[0].device_kind}
  for per_sm in (1, 2, 4):
    f = spin_kernel(threads, regs, per_sm * sms)
    row[f"ms_{per_sm}_per_sm"] = round(time_ms(f, iters=5, repeats=5), 4)
  child_done(row, out)


def main():
  args = variant_parser(VARIANTS).parse_args()
  if args.child:
    return child(args.child, os.path.join(args.out, f"{args.child}.json"))
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for name in args.variants.split(","):
    row = run_variant("benchmarks.diag.probe_two_ctas", name, args.out, timeout=300)
    row["ptxas"] = [r for r in row["ptxas"] if "registers" in r][:1]
    rows.append(row)
    print(json.dumps(row), flush=True)
  json.dump(rows, open(os.path.join(args.out, "summary.json"), "w"), indent=1)


if __name__ == "__main__":
  main()
