"""The benchmark CLI's CPU smoke run (`python -m benchmarks run --suite all --quick`): every
suite runs or says why not, every case of ours has times, TFLOP/s, and (block-sparse cases)
a speedup beside its bound; the JSON carries the device, versions and commit; the Markdown
table lists every row."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # The CLI's own 4 host devices; conftest's cheaper LLVM passes (compiles dominate here).
  env["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f)
  res = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--suite", "all", "--quick",
                        "--peers", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  return out, res.stdout


def test_every_suite_reports(quick_run):
  out, stdout = quick_run
  data = json.load(open(out / "results.json"))
  for key in ("device", "platform", "jax", "date", "dtype", "commit"):
    assert key in data
  suites = {r["suite"] for r in data["rows"]}
  from benchmarks.cli import SUITES
  assert suites == set(SUITES)
  ours = [r for r in data["rows"] if r.get("impl", "").startswith("ours")]
  assert ours and not [r for r in ours if "error" in r]
  for r in ours:
    if r["suite"] == "models":
      assert r["step_ms"] > 0
      continue
    assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["fwd_tflops"] > 0
    assert r["fwd_compile_s"] >= 0
    if r["bound"] is not None:
      assert r["speedup_fwd"] > 0, r
  peers = [r for r in data["rows"] if r.get("impl", "").startswith("peer: xla")]
  assert {r["suite"] for r in peers} == {"dense", "causal", "window"}
  assert any(r["suite"] == "cp" and "4 devices" in r["case"] for r in ours)
  assert "[1/" in stdout  # progress lines
  table = open(out / "results.md").read()
  assert table.count("\n| ") >= len(data["rows"])


def test_speedups():
  """Speedups over our dense kernel: forward, training, and the backward alone with its share
  of the block bound (2-D NA k33 on an H100: dense 7.19 / 30.0 ms, ours 0.908 / 4.55, bound
  8.53: the backward 6.27x, 0.73 of the bound); no backward figure where a difference is not
  positive (CPU noise at tiny sizes)."""
  from benchmarks.cli import speedups
  s = speedups(7.19, 30.0, 0.908, 4.55, 8.53)
  assert s["speedup_fwd"] == 7.92 and s["speedup_fwd_bwd"] == 6.59
  assert s["speedup_bwd"] == 6.26 and s["bwd_share_of_bound"] == 0.734
  assert "speedup_bwd" not in speedups(1.0, 2.0, 0.5, 0.5, 2.0)
  assert speedups(0.1, 0.3, 25.0, 60.0, 2.0)["speedup_fwd"] == 0.004  # not rounded to 0.0


def test_unknown_suite_is_an_error():
  res = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--suite", "nope"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode != 0 and "unknown suite" in res.stderr


def test_interleaved_times_each_variant_under_its_knobs():
  """The lab harness (`benchmarks.diag.interleaved`): a knob read at trace time, set by a
  variant's maker that clears jax's caches (as `knob_setter` does), is the variant's own in
  every trace that gets timed, not the knob set last (which every earlier jitted step would
  retrace under)."""
  import jax
  import jax.numpy as jnp
  from benchmarks import diag
  knob, traced = {"v": None}, []

  def make(v):
    knob["v"] = v
    jax.clear_caches()

    def fn(q, k, v_):
      traced.append(knob["v"])
      return q * 2.0 + k + v_
    return fn

  x = jnp.ones((1, 8, 1, 4))
  row = {}
  grads = diag.interleaved(row, {"a": lambda: make("a"), "b": lambda: make("b")},
                           (x, x, x, x), rounds=1, iters=1, repeats=1)
  assert set(grads) == {"a", "b"} and "a_fwd_bwd_ms_0" in row and "b_fwd_ms_0" in row
  # Traces in order: each variant's gradients, then each timing (forward, fwd+bwd).
  assert traced and traced[-1] == "b"
  assert [t for t in traced if t == "a"] and traced.index("b") > traced.index("a")
  timed = traced[traced.index("b"):]  # after the first "b" trace: b's grads, then timings
  assert "a" in timed, "a's timing must retrace under a's knob"


def test_interleaved_vs_first():
  """`diag.interleaved_vs_first`: each later variant's gradients against the first's."""
  import jax.numpy as jnp
  from benchmarks import diag
  x = jnp.ones((1, 8, 1, 4))
  row = {}
  diag.interleaved_vs_first(row, {"a": lambda: (lambda q, k, v: q + k + v),
                                  "b": lambda: (lambda q, k, v: q + k + 2 * v)},
                            (x, x, x, x), rounds=1)
  assert row["b_rel_diff"] > 0.1 and "a_rel_diff" not in row and "a_fwd_ms_0" in row


def test_rel_errors():
  """`bench_gpu.rel_errors`: relative L2 per named array, rounded where asked; tuples of
  different lengths are an error, not a silently shorter check."""
  import jax.numpy as jnp
  from benchmarks.bench_gpu import rel_errors
  want = (jnp.ones(4), jnp.full(4, 2.0), jnp.ones(4), jnp.ones(4))
  got = (jnp.ones(4), jnp.full(4, 3.0), jnp.zeros(4), jnp.ones(4))
  assert rel_errors(got, want) == {"out": 0.0, "dq": 0.5, "dk": 1.0, "dv": 0.0}
  assert rel_errors(got[:2], want[:2], ("a", "b"), digits=1) == {"a": 0.0, "b": 0.5}
  with pytest.raises(ValueError):
    rel_errors(got[:3], want)
  from benchmarks.bench_gpu import all_finite
  assert all_finite(got) and not all_finite((jnp.ones(2), jnp.array([1.0, jnp.nan])))
  assert not all_finite((jnp.array([jnp.inf], jnp.bfloat16),))


def test_shape_flags():
  """``--batch``, ``--heads``, ``--head-dim`` replace every case's own (the GQA case keeps a
  quarter of the heads as KV heads where they divide by 4) and the names say so; a value
  that is not a positive integer is an error that names the flag."""
  from benchmarks.cli import suites
  built = suites(False, heads=12, head_dim=64)
  gqa, = built["blocksparse"]()
  assert gqa.q_shape == (2, 8192, 12, 64) and gqa.kv_shape == (2, 8192, 3, 64)
  assert gqa.name.endswith("GQA 12/3 [H=12, D=64]")
  window, = built["window"]()
  assert window.q_shape == (1, 32768, 12, 64) and "B=1 [H=12, D=64]" in window.name
  na3d, = suites(False, batch=4)["gna3d"]()
  assert na3d.q_shape[0] == 4 and "B=1" not in na3d.name and na3d.name.endswith("[B=4]")
  assert [c.name for c in suites(False)["dense"]()] == ["dense S=4096", "dense S=16384"]
  res = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--quick", "--heads", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert res.returncode != 0 and "--heads: must be a positive integer" in res.stderr


def test_commit_field(monkeypatch):
  """The results' commit: `JSA_COMMIT` where set (a copied checkout whose git directory lags
  its files), else git's short HEAD, marked "+modified" where tracked files differ."""
  from benchmarks import cli
  monkeypatch.setenv("JSA_COMMIT", "abc1234")
  assert cli._git_commit() == "abc1234"
  monkeypatch.delenv("JSA_COMMIT")
  got = cli._git_commit()
  assert got is None or got.split("+")[0].isalnum() and got.count("+") <= 1


_FAKE_VARIANT = '''
import time
from benchmarks.diag import child_done, variant_parser
args = variant_parser(["done", "hangs"]).parse_args()
print("ptxas info    : Compiling entry function 'attention_kernel' for 'sm_90a'")
print("ptxas info    : Used 168 registers, 8 bytes spill stores, 4 bytes spill loads")
if args.child == "done":
  child_done({"variant": "done", "ms": 1.5}, args.out + "/done.json")
print('{"variant": "hangs", "step": 1}', flush=True)
time.sleep(120)
'''


def test_run_variant(tmp_path):
  """The lab's child-process runner (`benchmarks.diag.run_variant`): a child's own row with
  ptxas' registers and spills, and the last line a hung child printed before its timeout."""
  from benchmarks.diag import run_variant
  (tmp_path / "fake_variant.py").write_text(_FAKE_VARIANT)
  env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT]), "JAX_PLATFORMS": "cpu"}
  row = run_variant("fake_variant", "done", str(tmp_path), env=env, timeout=120)
  assert row == {"variant": "done", "ms": 1.5, "ptxas": [
      {"kernel": "attention_kernel", "registers": 168},
      {"kernel": "attention_kernel", "spill_stores": 8, "spill_loads": 4}]}
  row = run_variant("fake_variant", "hangs", str(tmp_path), env=env, timeout=20)
  assert row["rc"] == "timeout" and row["step"] == 1 and row["ptxas"][0]["registers"] == 168


def test_read_sass_samples(tmp_path):
  """Nsight Compute's source page: notes before the header, thousands separators, predicated
  opcodes; spills (LDL/STL) counted by their share of the samples."""
  from benchmarks.diag import read_sass_samples
  path = tmp_path / "x-sass.csv"
  path.write_text(
      '"Kernel Name","k"\n'
      '"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"\n'
      '"0x10","LDL.64 R2, [R1+0x8]","1,200","5,000"\n'
      '"0x20","@!P0 HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24","2,400","1,000"\n'
      '"0x30","@P1 STL [R1+0x10], R7","400","5,000"\n')
  s = read_sass_samples.summarize(read_sass_samples.read(path), top=2)
  assert s["samples"] == 4000 and s["instructions"] == 3
  assert s["by_opcode"] == {"HGMMA": 0.6, "LDL": 0.3, "STL": 0.1}
  assert s["local_memory_share"] == 0.4 and s["local_memory_instructions"] == 2
  assert [r["address"] for r in s["top"]] == ["0x20", "0x10"]
  rows = read_sass_samples.read(path)
  assert [r["Address"] for r in read_sass_samples.region(rows, "10-20")] == ["0x20"]
  mapped = read_sass_samples.bins(rows, 0x20)  # offsets 0x00-0x1f, then 0x20
  assert [(off, round(share, 2)) for off, share, *_ in mapped] == [(0, 0.9), (0x20, 0.1)]
  assert mapped[0][3] == {"LDL": 1, "HGMMA": 1} and mapped[1][3] == {"STL": 1}


def test_fwd_forms_switches(monkeypatch):
  """`diag_fwd_forms`' forms set the switch and the switches that go with it: "8/plain"
  keeps the max without the branch, "none" the running max every step."""
  from benchmarks.diag import diag_fwd_forms
  from pallas_kernels.gpu.mosaic_gpu import attention_fwd
  monkeypatch.setattr(attention_fwd, "LAZY_RESCALE", attention_fwd.LAZY_RESCALE)
  monkeypatch.setattr(attention_fwd, "LAZY_BRANCH", attention_fwd.LAZY_BRANCH)
  parse = diag_fwd_forms.SWITCHES["LAZY_RESCALE"][1]
  got = []
  for raw in ("none", "8", "8/plain"):
    diag_fwd_forms._set_form(attention_fwd, (parse(raw), raw))
    got.append((attention_fwd.LAZY_RESCALE, attention_fwd.LAZY_BRANCH))
  assert got == [(None, True), (8.0, True), (8.0, False)]


def test_decide_lazy():
  """The conditional rescale's decision rule: on where half the cases gain 2% and none loses
  2%, off where one case loses or a small check fails."""
  from benchmarks.diag.decide_lazy import decide
  check = {"check": "dense", "lazy8": 2e-3, "lazy8_finite": True}
  row = lambda case, a, b: {"case": case, "every_fwd_ms": [a, a], "lazy8_fwd_ms": [b, b]}
  on, table = decide([check, row("a", 1.0, 0.95), row("b", 1.0, 1.0)])
  assert on and [round(t[-1], 2) for t in table] == [0.95, 1.0]
  assert not decide([check, row("a", 1.0, 0.95), row("b", 1.0, 1.03)])[0]
  assert not decide([check, row("a", 1.0, 0.95), row("b", 1.0, 0.99), row("c", 1.0, 0.99)])[0]
  assert not decide([dict(check, lazy8=1e-2), row("a", 1.0, 0.9)])[0]
