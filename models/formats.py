"""The format adapters of a model repository: TorchScript, ``torch.export`` archives, ONNX.

Each is a :class:`~autoglm.models.adapters.RepositoryModel` that adds only how
to load the file (``load_weights``) and run a collated batch (``predict``);
input checks, batching, output naming and the checked warm-up are the base's.

Nothing here imports Kafka; onnxruntime is imported when an ONNX model loads.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from autoglm.processors.errors import ModelLoadError
from autoglm.models.adapters import RepositoryModel
from autoglm.models.spec import ModelSpec

ONNX_HINT = "pip install 'open-autoglm[onnx]'"



class TorchScriptModel(RepositoryModel):
    """A ``.pt`` made by ``torch.jit.script`` or ``torch.jit.trace`` (``format: torchscript``).

    The module is called as ``module(*inputs)`` in the declared input order (a
    text model gets one ``List[str]``) under ``torch.inference_mode``.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.module: Any = None

    def load_weights(self, device: str) -> None:
        """``torch.jit.load(file, map_location=device)`` in eval mode.

        Raises:
            ModelLoadError: the file is not a TorchScript archive (e.g. a
                ``torch.save`` state dict) or cannot be mapped to ``device``.
        """
        import torch

        try:
            with warnings.catch_warnings():  # torch 2.x deprecates TorchScript in favour of torch.export
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(str(self.spec.file), map_location=device).eval()
        except Exception as exc:
            raise ModelLoadError(
                f"model {self.name!r} ({self.spec.source}, key 'file'): {self.spec.file} is not a loadable "
                f"TorchScript archive (made by torch.jit.script/trace and .save): {exc!r}"
            ) from exc

    def predict(self, batch: Any) -> Any:
        """``module(*tensors)`` on the model's device."""
        import torch

        if self.spec.text:
            return self.module(batch)
        args = [torch.from_numpy(batch[t.name]).to(self.device) for t in self.spec.inputs]
        return self.module(*args)


class ExportedModel(RepositoryModel):
    """A ``torch.export`` archive (``format: exported``, usually ``.pt2``) made by ``torch.export.save``.

    Export it with a dynamic batch axis, e.g.
    ``torch.export.export(net, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})``,
    or it only accepts the batch size it was exported with. No Python code of
    the model is needed to load it (unlike a pickled module).
    """

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.module: Any = None

    def load_weights(self, device: str) -> None:
        """``torch.export.load(file).module()`` moved to ``device``.

        Raises:
            ModelLoadError: the file is not a ``torch.export`` archive.
        """
        import torch

        try:
            self.module = torch.export.load(str(self.spec.file)).module().to(device)
        except Exception as exc:
            raise ModelLoadError(
                f"model {self.name!r} ({self.spec.source}, key 'file'): {self.spec.file} is not a loadable "
                f"torch.export archive (made by torch.export.save): {exc!r}"
            ) from exc

    def predict(self, batch: Any) -> Any:
        """``module(*tensors)`` on the model's device."""
        import torch

        args = [torch.from_numpy(batch[t.name]).to(self.device) for t in self.spec.inputs]
        return self.module(*args)


class OnnxModel(RepositoryModel):
    """An ONNX graph run by onnxruntime (``format: onnx``; extra ``onnx``).

    Inputs and outputs are matched by their graph names, which must equal the
    names in ``model.yaml``. On ``cuda`` the CUDA execution provider is used
    when onnxruntime has it, with the CPU provider behind it.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.session: Any = None

    def load_weights(self, device: str) -> None:
        """Open an ``onnxruntime.InferenceSession`` with as many intra-op threads as torch uses.

        Raises:
            ModelLoadError: onnxruntime is missing (names the extra) or the file is not a valid ONNX model.
            ModelSpecError: the graph's input or output names differ from ``model.yaml``'s.
        """
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelLoadError(f"model {self.name!r}: format 'onnx' needs onnxruntime: {ONNX_HINT} ({exc})") from exc
        import torch

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            index = int(device.partition(":")[2] or 0)
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(self.spec.file), sess_options=options, providers=providers)
        except Exception as exc:
            raise ModelLoadError(f"model {self.name!r} ({self.spec.source}, key 'file'): {self.spec.file} "
                                 f"is not a loadable ONNX model: {exc!r}") from exc
        for key, declared, graph in (("inputs", self.spec.inputs, session.get_inputs()),
                                     ("outputs", self.spec.outputs, session.get_outputs())):
            want, have = [t.name for t in declared], [g.name for g in graph]
            if sorted(want) != sorted(have):
                raise self.spec.error(key, f"the ONNX graph's {key} {have}", want)
        self.session = session

    def predict(self, batch: Any) -> Any:
        """``session.run(output names, {input name: array})``; texts go in as a numpy object array."""
        names = [o.name for o in self.spec.outputs]
        if self.spec.text:
            feeds = {self.spec.inputs[0].name: np.array(batch, dtype=object)}
        else:
            feeds = dict(batch)
        return dict(zip(names, self.session.run(names, feeds)))
