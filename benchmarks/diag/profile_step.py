"""Where a benchmark case's fwd+bwd step goes, kernel by kernel (ours and the XLA ops around
them: delta, zero fills, casts, pads): the step repeated under `jax.profiler.trace`, the GPU
plane's events summed by name, per step, with the GPU's idle time before each kernel (since
the previous one ended) and the host's time per event name (launches, thunks).

    python -m benchmarks.diag.profile_step lm [steps] [--out x.json]

Cases: the LM layer (`lm`, `lm_docs`, `lm_d64`), the causal window, causal, and the CLI's
rows `moba` (S=32768 causal, top 32 + 2 local of 256 blocks, selection included), `na2d`,
`na3d` and `strided`; `moba_mha` / `moba_gqa`: MoBA's row with pooled-score selection at 16
and 4 KV heads.
"""
import collections
import glob
import json
import sys
import tempfile

import jax
import jax.numpy as jnp

import jax_sparse_attn as jsa
from jax_sparse_attn import masks

from ..bench_gpu import documents, fwd_bwd, inputs

LM = masks.causal() & (masks.sliding_window(511) | masks.sink(4))
# name: (mask, batch, seq, heads, kv heads, head_dim, documents)
CASES = {
    "lm": (LM, 2, 8192, 16, 4, 128, 0),
    "lm_docs": (LM, 2, 8192, 16, 4, 128, 4),
    "lm_d64": (LM, 2, 8192, 8, 2, 64, 2),
    "window": (masks.causal() & masks.sliding_window(2047), 1, 32768, 16, 16, 128, 0),
    "causal": (masks.causal(), 2, 16384, 16, 16, 128, 0),
}


SUITES = {"moba": "routing", "na2d": "gna2d", "na3d": "gna3d", "strided": "strided"}
# MoBA's row (S=32768, B=1, H=16, D=128, pooled-score top 32 + 2 local of 256 blocks) at these
# KV heads.
ROUTED = {"moba_mha": 16, "moba_gqa": 4}


def _step(name):
  if name in ROUTED:
    from jax_sparse_attn import routing
    big = inputs((1, 32768, 16, 128), (1, 32768, ROUTED[name], 128), jnp.bfloat16)
    return fwd_bwd(lambda q, k, v: jsa.attention(
        q, k, v, masks.causal(), block_selection=routing.topk_blocks(
            q, k, 128, 32, causal=True, local_blocks=2))), big
  if name in SUITES:  # the benchmark CLI's case
    from ..cli import suites
    case = suites(quick=False)[SUITES[name]]()[0]
    big = inputs(case.q_shape, case.kv_shape, jnp.bfloat16)
    return fwd_bwd(lambda q, k, v: case.run(q, k, v, "auto")), big
  mask, b, s, h, hkv, d, docs = CASES[name]
  seg = documents(b, s, docs) if docs else None
  big = inputs((b, s, h, d), (b, s, hkv, d), jnp.bfloat16)
  return fwd_bwd(lambda q, k, v: jsa.attention(q, k, v, mask, segment_ids=seg)), big


def profile(step, big, steps: int) -> dict:
  """GPU time per kernel name, the GPU's idle time and the host's time per event name of
  `steps` calls of step(*big) (compiled and warmed first) under `jax.profiler.trace`."""
  jax.block_until_ready(step(*big))
  trace_dir = tempfile.mkdtemp()
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      out = step(*big)
    jax.block_until_ready(out)
  data = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb",
                                                      recursive=True)[0])
  total, count = collections.Counter(), collections.Counter()
  gaps, host = collections.Counter(), collections.Counter()
  lines, spans = [], []
  for plane in data.planes:
    if plane.name.startswith("/host:CPU"):  # host time per event name (launches, thunks)
      for line in plane.lines:
        for event in line.events:
          host[f"{line.name}: {event.name}"[:120]] += event.duration_ns
    if not plane.name.startswith("/device:GPU:0"):
      continue
    for line in plane.lines:
      lines.append(line.name)
      if "stream" not in line.name.lower():  # kernels per stream, not the XLA op lines
        continue
      events = sorted(line.events, key=lambda e: e.start_ns)
      for prev, event in zip([None] + events[:-1], events):
        total[event.name] += event.duration_ns
        count[event.name] += 1
        if prev is not None:  # the GPU idle before this kernel, since the last one ended
          gaps[event.name] += max(0.0, event.start_ns - prev.start_ns - prev.duration_ns)
      if events:
        spans.append(events[-1].start_ns + events[-1].duration_ns - events[0].start_ns)
  rows = [{"kernel": k[:120], "us_per_step": round(t / steps / 1e3, 2),
           "idle_before_us_per_step": round(gaps[k] / steps / 1e3, 2),
           "launches_per_step": count[k] / steps} for k, t in total.most_common()]
  return {"steps": steps,
          "gpu_us_per_step": round(sum(total.values()) / steps / 1e3, 1),
          "gpu_span_us_per_step": round(max(spans, default=0) / steps / 1e3, 1),
          "gpu_idle_us_per_step": round(sum(gaps.values()) / steps / 1e3, 1),
          "lines": lines, "kernels": rows,
          "host_us_per_step": [{"event": k, "us": round(t / steps / 1e3, 2)}
                               for k, t in host.most_common(25)]}


def main():
  name = sys.argv[1]
  steps = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 20
  step, big = _step(name)
  summary = {"case": name, **profile(step, big, steps)}
  print(json.dumps(summary, indent=1), flush=True)
  if "--out" in sys.argv:
    json.dump(summary, open(sys.argv[sys.argv.index("--out") + 1], "w"), indent=1)


if __name__ == "__main__":
  main()
