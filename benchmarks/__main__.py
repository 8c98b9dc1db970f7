"""`python -m benchmarks run ...` / `python -m benchmarks list` (see benchmarks/cli.py)."""
import os
import sys

# Several host devices, so the context-parallel suite runs on CPU too (no effect on GPUs/TPUs).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=4").strip()

from benchmarks.cli import main  # noqa: E402

sys.exit(main())
