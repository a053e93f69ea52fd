"""Linear probe against scikit-learn, few-shot selection, feature cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from clipkit.eval import probe


def blobs(n: int, num_classes: int = 8, dim: int = 24, seed: int = 0):
    """Overlapping Gaussian classes: separable-ish, so accuracy is high but below 1."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).standard_normal((num_classes, dim)) * 0.7
    y = rng.integers(0, num_classes, n)
    return (centers[y] + rng.standard_normal((n, dim))).astype(np.float32), y


@pytest.fixture(scope="module")
def data():
    return (*blobs(1200, seed=0), *blobs(800, seed=1))


def preprocess(train_x, test_x):
    """What train_linear_probe does to features: L2 rows, then z-score with train stats."""
    train, test = (
        F.normalize(torch.tensor(train_x), dim=-1),
        F.normalize(torch.tensor(test_x), dim=-1),
    )
    mean, std = train.mean(0), train.std(0)
    return ((train - mean) / std).numpy(), ((test - mean) / std).numpy()


@pytest.mark.parametrize("wd", [1e-4, 1e-2])
def test_lbfgs_matches_sklearn_objective(data, wd):
    train_x, train_y, test_x, test_y = data
    xs, xt = preprocess(train_x, test_x)
    weight, bias = probe.fit_logistic_regression(torch.tensor(xs), torch.tensor(train_y), 8, wd)
    # mean CE + wd/2 ||W||^2  ==  sklearn's C * sum CE + 1/2 ||W||^2 with C = 1 / (wd * n)
    sk = LogisticRegression(C=1 / (wd * len(xs)), tol=1e-10, max_iter=5000)
    sk.fit(xs.astype(np.float64), train_y)
    np.testing.assert_allclose(weight.numpy().T, sk.coef_, atol=5e-3 * np.abs(sk.coef_).max())
    ours = ((torch.tensor(xt) @ weight + bias).argmax(1).numpy() == test_y).mean()
    assert abs(ours - sk.score(xt, test_y)) <= 0.01


def test_probe_accuracy_matches_sklearn_at_chosen_wd(data):
    train_x, train_y, test_x, test_y = data
    grid = (1e-5, 1e-3, 1e-1, 10.0)
    result = probe.train_linear_probe(train_x, train_y, test_x, test_y, wd_grid=grid, seed=0)
    wd = result["best_weight_decay"]
    assert result["weight_decay"] == wd and wd < 10.0  # very strong decay underfits
    xs, xt = preprocess(train_x, test_x)
    sk = LogisticRegression(C=1 / (wd * len(xs)), tol=1e-8, max_iter=5000).fit(xs, train_y)
    assert abs(result["lp_acc1"] - sk.score(xt, test_y)) <= 0.01
    assert 0.6 < result["lp_acc1"] < 1.0
    assert result["lp_acc1"] <= result["lp_acc5"] <= 1.0
    assert {wd for wd, _ in result["sweep"]} >= set(grid)  # grid plus refinements
    assert result == probe.train_linear_probe(
        train_x, train_y, test_x, test_y, wd_grid=grid, seed=0
    )  # deterministic


def test_stratified_split():
    labels = np.repeat(np.arange(4), [10, 20, 5, 1])
    train, val = probe.stratified_split(labels, 0.2, seed=0)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert np.bincount(labels[val], minlength=4).tolist() == [2, 4, 1, 0]


def test_few_shot_indices():
    labels = np.repeat(np.arange(5), [7, 3, 9, 4, 12])
    picked = probe.few_shot_indices(labels, 3, seed=1)
    assert np.bincount(labels[picked]).tolist() == [3] * 5
    assert np.array_equal(picked, probe.few_shot_indices(labels, 3, seed=1))
    assert not np.array_equal(picked, probe.few_shot_indices(labels, 3, seed=2))
    with pytest.raises(ValueError, match="class 1 has 3 examples"):
        probe.few_shot_indices(labels, 4, seed=0)


def test_few_shot_probe_mean_and_std(data):
    train_x, train_y, test_x, test_y = data
    result = probe.few_shot_probe(
        train_x, train_y, test_x, test_y, shots=4, seeds=(0, 1, 2), wd_grid=(1e-3, 1e-1)
    )
    accs = [run["lp_acc1"] for run in result["per_seed"]]
    assert result["lp_acc1"] == pytest.approx(np.mean(accs))
    assert result["lp_acc1_std"] == pytest.approx(np.std(accs, ddof=1))
    assert result["fewshot_k"] == 4 and all(run["n_train"] == 32 for run in result["per_seed"])
    assert len(set(accs)) > 1  # different seeds, different shots
    full = probe.train_linear_probe(train_x, train_y, test_x, test_y, wd_grid=(1e-3, 1e-1))
    assert result["lp_acc1"] < full["lp_acc1"]


def test_feature_cache(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(12.0).reshape(4, 3), np.array([0, 1, 0, 1])

    key = {"checkpoint": "ab12", "data": "cifar10/test", "transform": "224-center"}
    x1, y1 = probe.cached_features(tmp_path, key, compute)
    x2, y2 = probe.cached_features(tmp_path, dict(reversed(key.items())), compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert x2.dtype == np.float32 and x2[3, 2] == 11.0
    probe.cached_features(tmp_path, {**key, "checkpoint": "cd34"}, compute)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"features-{probe.cache_key(k)}.npz" for k in (key, {**key, "checkpoint": "cd34"})
    )


def test_feature_cache_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken_savez(file, **arrays):
        file.write(b"half a cache entry")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        probe.cached_features(tmp_path, {"k": 1}, lambda: (np.zeros((2, 2)), np.zeros(2)))
    assert list(tmp_path.iterdir()) == []
