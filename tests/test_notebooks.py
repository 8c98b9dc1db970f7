"""The Colab notebooks (colab/*.ipynb) run top to bottom on CPU (small sizes there), so they
never rot; and they are what `colab/make_notebooks.py` writes."""
import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "colab")) if f.endswith(".ipynb"))


def test_three_notebooks_generated_from_their_source(tmp_path):
  assert NOTEBOOKS == ["01_quickstart.ipynb", "02_train_nat.ipynb", "03_sharded.ipynb"]
  src = os.path.join(ROOT, "colab", "make_notebooks.py")
  code = open(src).read().replace("HERE = os.path.dirname(os.path.abspath(__file__))",
                                  f"HERE = {str(tmp_path)!r}")
  subprocess.run([sys.executable, "-c", code], check=True)
  for name in NOTEBOOKS:
    fresh = nbformat.read(tmp_path / name, as_version=4)
    committed = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
    assert [c.source for c in fresh.cells] == [c.source for c in committed.cells], name


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", ROOT)  # (the kernel inherits conftest's XLA_FLAGS: 8 devices)
  nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": ROOT}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.output_type == "error"]
  assert not errors
