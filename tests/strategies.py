"""Hypothesis strategies shared by the test files."""
import os

from hypothesis import settings
from hypothesis import strategies as st


def examples(ci: int) -> int:
  """A test's max_examples: `ci` under the CI profile (what its interpret-mode kernels cost on
  the 2-core CI machine), else the loaded profile's (thorough: 200, sweep: HYPOTHESIS_EXAMPLES;
  an explicit max_examples would otherwise override the profile's)."""
  if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
    return ci
  return settings.default.max_examples


@st.composite
def gna_problems(draw, max_ndim=3, max_len=12):
  ndim = draw(st.integers(1, max_ndim))
  spatial, kernel, stride, dilation, causal = [], [], [], [], []
  for _ in range(ndim):
    length = draw(st.integers(2, max_len))
    d = draw(st.integers(1, max(1, length // 2)))
    k = draw(st.integers(1, length // d))
    s = draw(st.integers(1, k))
    spatial.append(length)
    kernel.append(k)
    stride.append(s)
    dilation.append(d)
    causal.append(draw(st.booleans()))
  return tuple(spatial), tuple(kernel), tuple(stride), tuple(dilation), tuple(causal)
