import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Multi-device code runs on forced host devices.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
# Tests compile many small programs once each: cheaper LLVM passes (8-12% of the suite's
# time on the 2-core CI machine; the numerics are checked against float64 with tolerances).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += (" --xla_backend_optimization_level=0"
                              " --xla_llvm_disable_expensive_passes=true")

# GPU interpret mode runs each warpgroup as its own XLA:CPU computation whose barrier waits
# block inside host callbacks. XLA's concurrency-optimized scheduler lets the CPU runtime run
# a computation's independent callbacks on its intra-op pool (one thread per core): on 2
# cores, waits blocked on both pool threads starve the warpgroup they wait for (a deadlock
# at e.g. GQA 2-D neighborhoods on the Hopper backward; README, Tests).
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=8, derandomize=True,
                          print_blob=True)
settings.register_profile("thorough", deadline=None, max_examples=200)
# A randomized sweep between releases: new examples each run, as many as HYPOTHESIS_EXAMPLES.
settings.register_profile("sweep", deadline=None, print_blob=True,
                          max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "25")))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Interpret-mode kernels' callbacks take numpy arguments (3-4x faster; tests/numpy_callbacks.py).
import numpy_callbacks  # noqa: E402

numpy_callbacks.install()
