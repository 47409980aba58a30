"""Train the ``sentiment-head`` classifier of the text pipeline and write it as a repository model.

The labelled text set is the AFINN-en-165 word list that the ``afinn`` package ships
(3,382 English words and phrases rated -5..+5 by Finn Årup Nielsen, ODbL; no download at run
time): a word rated above 0 is ``positive`` (class 1), below 0 ``negative`` (class 0). Each
word is embedded by the built-in ``minilm`` model (all-MiniLM-L6-v2, 384 dims), and a logistic
regression head (``torch.nn.Linear(384, 2)`` + softmax) is trained on 80 % of the words
(stratified split, seed 0; full-batch Adam, 300 steps: about a second on a CPU) and scored on
the other 20 %. The head is saved as TorchScript with its ``model.yaml``::

    python examples/pipelines/text-sentiment/make_head.py [REPO_DIR]

(default ``examples/pipelines/text-sentiment/repo``), then ``autoglm pipeline dry-run
examples/pipelines/text-sentiment/pipeline.yaml --model-repo examples/pipelines/text-sentiment/repo
--inputs examples/pipelines/text-sentiment/samples.jsonl``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

STEPS = 300
LEARNING_RATE = 0.05
MODEL_YAML = """\
format: torchscript
file: model.pt
description: "sentiment of a text from its minilm embedding: float32 (B, 384) -> (B, 2) [negative, positive]"
inputs:
  - {name: embedding, dtype: float32, shape: [384]}
outputs:
  - {name: probabilities, dtype: float32, shape: [2]}
max_rows: 64
device: cpu
"""


def afinn_words() -> tuple[list[str], np.ndarray]:
    """The AFINN-en-165 entries rated != 0 and their labels (int64, 1 = positive), file order."""
    import afinn

    path = Path(afinn.__file__).with_name("data") / "AFINN-en-165.txt"
    words, labels = [], []
    for line in path.read_text("utf-8").splitlines():
        word, _, score = line.rpartition("\t")
        if word and int(score) != 0:
            words.append(word)
            labels.append(int(int(score) > 0))
    return words, np.asarray(labels, np.int64)


def embed(texts: list[str]) -> np.ndarray:
    """float32 (N, 384): the texts through the built-in ``minilm`` model, 64 at a time."""
    from autoglm.models.minilm import MiniLMModel
    from autoglm.models.runner import ModelRunner

    with ModelRunner(MiniLMModel(), device="cpu") as runner:
        parts = runner.run_sync([runner.model.prepare(texts[i:i + 64]) for i in range(0, len(texts), 64)])
    return np.concatenate(parts)


def build(repo: Path, every: int = 1) -> float:
    """Train the head, write ``repo/sentiment-head/{model.pt, model.yaml}``; returns the held-out accuracy.

    ``every``: use every n-th word only (the tests use 4, to embed a quarter of the list).
    """
    import torch
    from sklearn.model_selection import train_test_split

    words, labels = afinn_words()
    words, labels = words[::every], labels[::every]
    x = embed(words)
    x_tr, x_te, y_tr, y_te = train_test_split(x, labels, test_size=0.2, random_state=0, stratify=labels)
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], 2)
    opt = torch.optim.Adam(linear.parameters(), lr=LEARNING_RATE)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(linear(xt), yt).backward()
        opt.step()
    head = torch.nn.Sequential(linear, torch.nn.Softmax(dim=1)).eval()
    with torch.inference_mode():
        accuracy = float((head(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    folder = repo / "sentiment-head"
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(head), str(folder / "model.pt"))
    (folder / "model.yaml").write_text(MODEL_YAML)
    return accuracy


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("repo")
    acc = build(out)
    print(f"wrote {out / 'sentiment-head'}; held-out accuracy {acc:.3f} on 20 % of the AFINN words")
