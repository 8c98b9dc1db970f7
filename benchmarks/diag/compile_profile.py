"""A pytest plugin: each test's XLA compiles (count and seconds) beside its wall time, to see
where the CI suite's time goes (docs/performance.md, "Where the CI suite's time goes").

    PYTHONPATH=$PWD .venv/bin/python -m pytest -n 2 --dist loadfile \\
        -p benchmarks.diag.compile_profile tests
    .venv/bin/python -m benchmarks.diag.compile_profile   # the table, most compile time first

Each worker writes /tmp/compile-profile-PID.json: [test id, compiles, compile s, wall s].
"""
import glob
import json
import os
import threading
import time

import pytest

OUT = "/tmp/compile-profile-{}.json"
_state = {"n": 0, "t": 0.0}
_lock = threading.Lock()
_rows = []


def _install():
  from jax._src import compiler
  real = compiler.backend_compile_and_load

  def timed(*args, **kwargs):
    start = time.perf_counter()
    try:
      return real(*args, **kwargs)
    finally:
      with _lock:
        _state["n"] += 1
        _state["t"] += time.perf_counter() - start

  compiler.backend_compile_and_load = timed


def pytest_configure(config):
  del config
  _install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  del nextitem
  n, t, wall = _state["n"], _state["t"], time.perf_counter()
  yield
  _rows.append((item.nodeid, _state["n"] - n, round(_state["t"] - t, 2),
                round(time.perf_counter() - wall, 2)))


def pytest_sessionfinish(session):
  del session
  with open(OUT.format(os.getpid()), "w") as f:
    json.dump(_rows, f)


def main():
  rows = [r for f in glob.glob(OUT.format("*")) for r in json.load(open(f))]
  if not rows:
    print("no profiles: run pytest with -p benchmarks.diag.compile_profile first")
    return
  print(f"{len(rows)} tests, {sum(r[3] for r in rows):.0f} s, compiling "
        f"{sum(r[2] for r in rows):.0f} s in {sum(r[1] for r in rows)} compiles")
  for test, n, t, wall in sorted(rows, key=lambda r: -r[2])[:40]:
    print(f"{n:5d} {t:7.2f} {wall:7.2f}  {test}")


if __name__ == "__main__":
  main()
