"""The same context-parallel code across processes: 2 processes x 2 CPU devices on localhost
(`jax.distributed.initialize`, CPU collectives through gloo), checked against each process's
single-device result (tests/multiprocess_worker.py)."""
import os
import socket
import subprocess
import sys


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_ring_and_halo_across_two_processes():
  port = _free_port()
  worker = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  # conftest's cheaper LLVM passes; the worker sets its own device count (2 a process)
  env["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f)
  procs = [subprocess.Popen([sys.executable, worker, str(i), "2", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append(out)
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    for name in ("ring", "halo", "halo 3-D", "allgather MoBA"):
      assert f"ok {name} process {i}" in out, out[-4000:]
