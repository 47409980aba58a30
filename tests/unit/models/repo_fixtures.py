"""Tiny real models for repository tests, written into a temporary repository.

Each builder writes ``<root>/<name>/model.yaml`` and the model file it names,
made from code here (no binary is checked in).
"""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import torch
from torch import nn


class TinyNet(nn.Module):
    """float32 (B, 4) -> float32 (B, 3): a linear layer and a tanh, seeded weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


def write_yaml(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.yaml"
    path.write_text(textwrap.dedent(text).lstrip(), "utf-8")
    return path


def torchscript_model(root: Path, name: str = "tiny", *, out_shape: str = "[3]", extra: str = "") -> nn.Module:
    """``<root>/<name>``: TinyNet scripted to model.pt; returns the eager module (the offline reference)."""
    net = TinyNet().eval()
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # torch 2.x deprecates TorchScript; it is still what users have
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(net).save(str(folder / "model.pt"))
    write_yaml(folder, f"""
        format: torchscript
        file: model.pt
        description: tiny linear + tanh
        inputs:
          - {{name: x, dtype: float32, shape: [4]}}
        outputs:
          - {{name: y, dtype: float32, shape: {out_shape}}}
        max_rows: 8
    """)
    if extra:
        with (folder / "model.yaml").open("a") as fh:
            fh.write(textwrap.dedent(extra).strip() + "\n")
    return net


def onnx_model(root: Path, name: str = "tiny-onnx") -> nn.Module:
    """``<root>/<name>``: TinyNet exported with torch.onnx.export (dynamic batch axis)."""
    net = TinyNet().eval()
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, (torch.zeros(2, 4),), str(folder / "model.onnx"), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
    write_yaml(folder, """
        format: onnx
        file: model.onnx
        inputs:
          - {name: x, dtype: float32, shape: [4]}
        outputs:
          - {name: y, dtype: float32, shape: [3]}
    """)
    return net


def exported_model(root: Path, name: str = "tiny-exported") -> nn.Module:
    """``<root>/<name>``: TinyNet as a torch.export archive with a dynamic batch axis."""
    net = TinyNet().eval()
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(net, (torch.zeros(2, 4),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(folder / "model.pt2"))
    write_yaml(folder, """
        format: exported
        file: model.pt2
        inputs:
          - {name: x, dtype: float32, shape: [4]}
        outputs:
          - {name: y, dtype: float32, shape: [3]}
    """)
    return net


TWO_HEADS = '''
import numpy as np
from autoglm.models.adapters import RepositoryModel


class TwoHeads(RepositoryModel):
    """logits float32 (B, 3) = x @ W; label int64 (B,) = argmax; W fixed."""

    W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10.0

    def load_weights(self, device):
        self.w = self.W.copy()

    def predict(self, batch):
        logits = batch["x"] @ self.w
        return {"logits": logits.astype(np.float32), "label": logits.argmax(axis=1).astype(np.int64)}


def make(spec):
    return TwoHeads(spec)
'''


def python_model(root: Path, name: str = "two-heads", module: str = "two_heads_model") -> Path:
    """``<root>/<name>``: a python-factory model with two named outputs of different dtypes."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(TWO_HEADS, "utf-8")
    return write_yaml(folder, f"""
        format: python
        factory: "{module}:make"
        inputs:
          - {{name: x, dtype: float32, shape: [4]}}
        outputs:
          - {{name: logits, dtype: float32, shape: [3]}}
          - {{name: label, dtype: int64, shape: []}}
        warmup: {{rows: 3}}
    """)
