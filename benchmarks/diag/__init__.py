"""Lab tools: one question each, run on the device machine (`run_device.sh`)."""
import json

import jax


class Rows:
  """The rows of a diagnostic: `record(**row)` keeps the row and prints it as a JSON line
  (printed lines survive a call that runs past its time limit); `write(path)` saves them with
  the device."""

  def __init__(self):
    self.rows = []

  def record(self, **row):
    self.rows.append(row)
    print(json.dumps(row), flush=True)

  def write(self, path):
    if path:
      with open(path, "w") as f:
        json.dump({"device": str(jax.devices()[0]), "rows": self.rows}, f, indent=1)
