"""Rewrite a results JSON whose timelines are per task into 0.25 s bins (older harness output),
then redraw its plots; with --readme also rewrite the table in benchmarks/README.md.

    python -m benchmarks.compact benchmarks/results/<stamp>-batching.json [--readme]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.batching import binned_timeline
from benchmarks.report import plot, update_readme

if __name__ == "__main__":
    readme = "--readme" in sys.argv
    for arg in (a for a in sys.argv[1:] if not a.startswith("--")):
        path = Path(arg)
        report = json.loads(path.read_text())
        for model in report["models"].values():
            for run in model["runs"].values():
                tl = run["timeline"]
                if "results" not in tl:
                    run["timeline"] = binned_timeline(tl["t_s"], tl["latency_ms"], tl["batch_size"])
        path.write_text(json.dumps(report, indent=1))
        stamp = report["stamp"]
        for model in report["models"]:
            plot(report, model, path.parent / f"{stamp}-{model}-trace.png")
        if readme:
            update_readme(report, stamp)
