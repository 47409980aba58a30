"""Write samples.jsonl: held-out digits for the routing example, some the CNN is unsure of.

Run from the repository root: ``python examples/pipelines/digits-routing/make_samples.py``.
Picks, from the held-out split of ``split_digits(0)``, the 4 images whose top ``digits``
probability is lowest (they take the ``second`` step) and the first 7 others, plus one task
of two rows (one of each); each task's ``attributes.label`` is the true digit.
"""

from pathlib import Path

import numpy as np
import orjson

from autoglm.models.digits import DigitsModel, split_digits
from autoglm.models.runner import ModelRunner

_, _, x_test, y_test = split_digits(0)
with ModelRunner(DigitsModel(), device="cpu") as runner:
    top = np.concatenate(runner.run_sync([runner.model.prepare(x_test[i:i + 200]) for i in range(0, len(x_test), 200)])).max(axis=1)
unsure = [int(i) for i in np.argsort(top)[:4]]
sure = [i for i in range(len(x_test)) if i not in unsure][:7]
lines = []
for n, i in enumerate(sure + unsure):
    lines.append({"id": f"d{n}", "inputs": np.round(x_test[i].reshape(1, 64), 4).tolist(),
                  "attributes": {"label": str(int(y_test[i]))}})
pair = [sure[0], unsure[0]]
lines.append({"id": "pair", "inputs": np.round(x_test[pair].reshape(2, 64), 4).tolist(),
              "attributes": {"label": ",".join(str(int(y_test[i])) for i in pair)}})
out = Path(__file__).with_name("samples.jsonl")
out.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
print(f"wrote {len(lines)} tasks to {out}; top probabilities of the unsure ones: {np.round(top[unsure], 3).tolist()}")
