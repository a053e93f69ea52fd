"""Metrics against CLIP_benchmark 1.6.2's own functions and scikit-learn."""

from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
import torch
from clip_benchmark.metrics import zeroshot_classification as cb_cls
from clip_benchmark.metrics import zeroshot_retrieval as cb_ret
from sklearn.metrics import balanced_accuracy_score

from clipkit.eval.metrics import (
    classification_metrics,
    retrieval_recall,
    retrieval_recall_from_index,
)
from clipkit.index import build_index, search


def _float_one_element(x):
    # CLIP_benchmark calls float() on a (1,) array, an error since numpy 2.4; take its element.
    if isinstance(x, np.ndarray):
        return builtins.float(x.reshape(-1)[0])
    return builtins.float(x)


@pytest.fixture
def cb_accuracy(monkeypatch):
    monkeypatch.setattr(cb_cls, "float", _float_one_element, raising=False)
    return cb_cls.accuracy


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("num_classes", [3, 5, 17])
def test_classification_matches_clip_benchmark(cb_accuracy, num_classes):
    gen = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(400, num_classes, generator=gen)
    # Targets skewed and missing one class, so balanced accuracy differs from plain accuracy.
    targets = torch.randint(0, num_classes - 1, (400,), generator=gen)
    targets[:150] = 0
    logits[:100, 0] += 2.0  # some signal for class 0
    ours = classification_metrics(logits, targets)
    if num_classes >= 5:
        acc1, acc5 = cb_accuracy(logits, targets, topk=(1, 5))
        assert ours["acc5"] == acc5
    else:
        (acc1,) = cb_accuracy(logits, targets, topk=(1,))
        assert math.isnan(ours["acc5"])
    assert ours["acc1"] == acc1
    ref = balanced_accuracy_score(targets.numpy(), logits.argmax(1).numpy())
    assert ours["mean_per_class_recall"] == pytest.approx(ref, abs=1e-12)
    assert ours["acc1"] != pytest.approx(ours["mean_per_class_recall"], abs=1e-3)


def test_classification_hand_computed():
    logits = torch.tensor([[3.0, 2, 1, 0, 0, 0], [0, 3, 2, 1, 0, 0], [0, 0, 0, 0, 1, 3]])
    targets = torch.tensor([0, 0, 5])
    m = classification_metrics(logits, targets)
    assert m["acc1"] == pytest.approx(2 / 3)
    assert m["acc5"] == 1.0
    # class 0: 1 of 2 right, class 5: 1 of 1 -> mean 0.75
    assert m["mean_per_class_recall"] == pytest.approx(0.75)


def clip_benchmark_retrieval(images, texts, text_to_image, ks, batch_size):
    """The core of `zeroshot_retrieval.evaluate`, after the embeddings are computed."""
    scores = texts @ images.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), text_to_image] = True
    out = {}
    for k in ks:
        image_r = cb_ret.batchify(
            cb_ret.recall_at_k, scores, positive_pairs, batch_size, "cpu", k=k
        )
        text_r = cb_ret.batchify(
            cb_ret.recall_at_k, scores.T, positive_pairs.T, batch_size, "cpu", k=k
        )
        out[f"image_retrieval_recall@{k}"] = (image_r > 0).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (text_r > 0).float().mean().item()
    return out


def paired_features(n_images=60, dim=16, seed=0, noise=1.2, integer=False):
    gen = torch.Generator().manual_seed(seed)
    captions = torch.randint(1, 6, (n_images,), generator=gen)
    captions[7] = 0  # an image without captions: a text-retrieval miss in CLIP_benchmark
    text_to_image = torch.repeat_interleave(torch.arange(n_images), captions)
    if integer:  # small integers: dot products are exact, so ties are frequent and bitwise equal
        images = torch.randint(-1, 2, (n_images, dim), generator=gen).float()
        texts = images[text_to_image] + torch.randint(
            -2, 3, (len(text_to_image), dim), generator=gen
        )
        return images, texts.float(), text_to_image
    images = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=gen), dim=-1)
    texts = images[text_to_image] + noise * torch.randn(len(text_to_image), dim, generator=gen) / 4
    return images, torch.nn.functional.normalize(texts, dim=-1), text_to_image


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
@pytest.mark.parametrize("integer", [False, True])
def test_retrieval_matches_clip_benchmark(chunk_size, integer):
    images, texts, t2i = paired_features(integer=integer)
    ks = (1, 5, 10)
    ref = clip_benchmark_retrieval(images, texts, t2i, ks, batch_size=32)
    ours = retrieval_recall(images, texts, t2i, ks=ks, chunk_size=chunk_size)
    assert ours.keys() == ref.keys()
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    # not a degenerate case: recall grows with k and is neither 0 nor 1
    assert 0 < ours["image_retrieval_recall@1"] < ours["image_retrieval_recall@10"] < 1
    if integer:  # many exact ties among the scores, resolved as CLIP_benchmark resolves them
        scores = texts @ images.T
        tenth = scores.topk(10, dim=1).values[:, -1:]
        assert ((scores == tenth).sum(dim=1) > 1).float().mean() > 0.5  # tie at the 10th place
    assert ours["text_retrieval_recall@10"] < 1  # the caption-less image can never be found


def test_retrieval_hand_computed():
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0, 0.9, 0.1], [0, 0.3, 1], [0.6, 0.8, 0.2]])
    t2i = torch.tensor([0, 1, 1, 2])
    r = retrieval_recall(images, texts, t2i, ks=(1, 2))
    # top images per text: t0 -> 0 (hit), t1 -> 1 (hit), t2 -> 2, 1 (hit at 2), t3 -> 1, 0 (miss)
    assert (r["image_retrieval_recall@1"], r["image_retrieval_recall@2"]) == (0.5, 0.75)
    # top texts per image: 0 -> t0, t3 (hit); 1 -> t1, t3 (hit); 2 -> t2 (of image 1), t3 (hit)
    assert r["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert r["text_retrieval_recall@2"] == 1.0


def test_recall_from_exact_index_equals_exact_recall():
    images, texts, t2i = paired_features(n_images=200, dim=16, seed=1)
    ks = (1, 5, 10)
    _, image_ids = search(build_index(images.numpy(), kind="flat"), texts.numpy(), 10)
    _, text_ids = search(build_index(texts.numpy(), kind="flat"), images.numpy(), 10)
    from_index = retrieval_recall_from_index(t2i, ks, image_ids=image_ids, text_ids=text_ids)
    exact = retrieval_recall(images, texts, t2i, ks=ks)
    assert from_index == pytest.approx(exact, abs=1e-6)
    # a lossy index loses recall, and the loss shows
    damaged = image_ids.copy()
    damaged[::2, 0] = -1
    worse = retrieval_recall_from_index(t2i, ks, image_ids=damaged)
    assert worse["image_retrieval_recall@1"] < exact["image_retrieval_recall@1"]
    assert set(worse) == {f"image_retrieval_recall@{k}" for k in ks}
    with pytest.raises(ValueError, match="need max"):
        retrieval_recall_from_index(t2i, (20,), image_ids=image_ids)
