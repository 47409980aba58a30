"""Write the example repository's model files from code (no binaries in git).

    python examples/model-repo/make_models.py [DIR]

DIR defaults to this folder. Writes ``DIR/scorer/model.pt`` (TorchScript,
``torch.jit.script``) and ``DIR/scorer-onnx/model.onnx`` (``torch.onnx.export``,
when the ``onnx`` package is installed), both from :class:`Scorer` with
seeded weights, so that they give the same outputs.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn


class Scorer(nn.Module):
    """float32 (B, 8) features -> float32 (B, 3) class probabilities: 8 -> 16 -> ReLU -> 3 -> softmax."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(features), dim=1)


def main(root: Path) -> None:
    """Write both model files under ``root``."""
    scorer = Scorer().eval()
    with warnings.catch_warnings():  # torch 2.x marks TorchScript deprecated; it still loads everywhere
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(scorer).save(str(root / "scorer" / "model.pt"))
    print(f"wrote {root / 'scorer' / 'model.pt'}")
    try:
        import onnx  # noqa: F401
    except ImportError:
        print("onnx is not installed (pip install onnx): scorer-onnx/model.onnx not written")
        return
    torch.onnx.export(scorer, (torch.zeros(2, 8),), str(root / "scorer-onnx" / "model.onnx"),
                      input_names=["features"], output_names=["probabilities"],
                      dynamic_axes={"features": {0: "batch"}, "probabilities": {0: "batch"}}, dynamo=False)
    print(f"wrote {root / 'scorer-onnx' / 'model.onnx'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
