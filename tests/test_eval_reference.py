"""clipkit's evaluation against the tools users trust, on one tiny trained checkpoint:
CLIP_benchmark's zero-shot classification and retrieval, scikit-learn's logistic regression,
and open_clip loading a `clipkit export` folder."""

import io
import tarfile

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from clipkit.data.eval_io import iter_tar_samples
from clipkit.data.eval_pairs import paired_set
from clipkit.data.eval_sets import classification_set
from clipkit.eval import LoaderSettings
from clipkit.eval.loading import load_model
from clipkit.eval.retrieval import embed_pairs, evaluate_retrieval
from clipkit.eval.zero_shot import run_zero_shot

TIGHT = {"rtol": 1e-5, "atol": 1e-6}

CPU = torch.device("cpu")


def _cb_accuracy(output, target, topk=(1,)):
    """CLIP_benchmark 1.6.2's `accuracy` with `.item()` where it calls float() on a one-element
    array (an error on numpy >= 2.4); the formula is unchanged."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_model(checkpoint=str(tiny_checkpoint))


@pytest.mark.parametrize("task", ["shape", "colour"])
def test_zero_shot_equals_clip_benchmark(loaded, demo_root, task, monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification as cb

    monkeypatch.setattr(cb, "accuracy", _cb_accuracy)
    data = classification_set("demo", demo_root, "test", loaded.preprocess, task=task)
    ours = run_zero_shot(loaded, data, device=CPU, reading=LoaderSettings(batch_size=16, workers=0))
    data.dataset.classes = data.classnames  # CLIP_benchmark reads dataloader.dataset.classes
    loader = torch.utils.data.DataLoader(
        data.dataset,
        batch_size=16,
        collate_fn=lambda s: (torch.stack([x[0] for x in s]), torch.tensor([x[1] for x in s])),
    )
    ref = cb.evaluate(
        loaded.model, loader, loaded.tokenizer, data.classnames, data.templates, "cpu", amp=False
    )
    assert ours["clipkit"]["num_samples"] == 64
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours["metrics"][name] == pytest.approx(ref[name], abs=1e-4), name
    assert 0.0 <= ours["metrics"]["acc1"] <= ours["metrics"]["acc5"] <= 1.0


def _multi_caption_shard(demo_root, out):
    """The demo eval images with 1-3 captions each (other samples' captions as extra lines)."""
    samples = [
        s
        for shard in sorted((demo_root / "eval").glob("*.tar"))
        for s in iter_tar_samples(str(shard))
    ]
    with tarfile.open(out, "w") as tar:
        for i, (key, fields) in enumerate(samples):
            # A distinct prefix per line: duplicate captions would tie, and ties may break
            # differently in FAISS and torch.topk.
            lines = [
                f"{i} {j} " + samples[(i + j * 7) % len(samples)][1]["txt"].decode()
                for j in range(i % 3 + 1)
            ]
            for ext, data in (("jpg", fields["jpg"]), ("txt", "\n".join(lines).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out


def test_retrieval_equals_clip_benchmark(loaded, demo_root, tmp_path):
    from clip_benchmark.metrics import zeroshot_retrieval as cb

    shard = _multi_caption_shard(demo_root, tmp_path / "multi.tar")
    data = paired_set(shard, loaded.preprocess)
    emb = embed_pairs(loaded, data, CPU, LoaderSettings(batch_size=16, workers=0))
    assert len(emb.keys) == 64 and len(emb.text_features) == sum(i % 3 + 1 for i in range(64))
    ks = [1, 5, 10]
    ours = evaluate_retrieval(emb, ks, index_type="flat")
    loader = torch.utils.data.DataLoader(
        data.dataset,
        batch_size=16,
        collate_fn=lambda s: (torch.stack([x[0] for x in s]), [x[1] for x in s]),
    )
    ref = cb.evaluate(loaded.model, loader, loaded.tokenizer, "cpu", amp=False, recall_k_list=ks)
    assert set(ours["metrics"]) == set(ref)
    for name, value in ref.items():
        assert ours["metrics"][name] == pytest.approx(value, abs=1e-4), name
        assert ours["index_metrics"][name] == pytest.approx(value, abs=1e-4), name  # flat: exact


def test_auto_index_meets_recall_target(loaded, demo_root):
    emb = embed_pairs(
        loaded, paired_set(demo_root / "train", loaded.preprocess), CPU, LoaderSettings(64, 0)
    )
    out = evaluate_retrieval(emb, [1, 10], index_type="hnsw", target_recall=0.9)
    report = out["indexes"]["image"]
    assert report["kind"] == "hnsw" and report["reached_target"]
    assert report["recall@10"] >= 0.9
    for name, exact in out["metrics"].items():  # what the index loses is small and visible
        assert out["index_metrics"][name] == pytest.approx(exact, abs=0.1)


def test_probe_close_to_sklearn(loaded, demo_root, tmp_path):
    from sklearn.linear_model import LogisticRegression

    from clipkit.eval.linear_probe import run_probe

    train, test = (
        classification_set("demo", demo_root, s, loaded.preprocess) for s in ("train", "test")
    )
    cache = tmp_path / "cache"
    reading = LoaderSettings(batch_size=32, workers=0)
    ours = run_probe(loaded, train, test, device=CPU, reading=reading, cache_dir=cache)
    files = sorted(cache.glob("features-*.npz"))
    assert len(files) == 2  # train and test features cached
    feats = {}
    for f in files:
        with np.load(f) as z:
            feats[len(z["y"])] = (z["x"], z["y"])
    (tx, ty), (vx, vy) = feats[96], feats[64]
    # The probe's preprocessing: unit rows, z-scored with train statistics.
    tx = tx / np.linalg.norm(tx, axis=1, keepdims=True)
    vx = vx / np.linalg.norm(vx, axis=1, keepdims=True)
    mean, std = tx.mean(0), np.maximum(tx.std(0, ddof=1), 1e-6)
    wd = ours["clipkit"]["weight_decay"]
    clf = LogisticRegression(C=1 / (wd * len(ty)), max_iter=5000, tol=1e-8)
    clf.fit((tx - mean) / std, ty)
    sk_acc1 = float((clf.predict((vx - mean) / std) == vy).mean())
    assert abs(ours["metrics"]["lp_acc1"] - sk_acc1) <= 0.01 + 1e-9
    # A second run reads the cache (same files, same result).
    again = run_probe(loaded, train, test, device=CPU, reading=reading, cache_dir=cache)
    assert again["metrics"] == ours["metrics"]
    assert sorted(cache.glob("features-*.npz")) == files


def test_export_round_trip_identical_outputs(loaded, tiny_checkpoint, tmp_path):
    import open_clip

    from clipkit.export import export_open_clip

    out = tmp_path / "export"
    export_open_clip(tiny_checkpoint, out)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    images = torch.rand(4, 3, 32, 32)
    tokens = loaded.tokenizer(["a red star", "two blue circles on the left"])
    with torch.no_grad():
        # two builds of the same weights (open_clip's loader, clipkit's): equal up to rounding,
        # since kernels may pick other paths on other CPUs or memory layouts
        assert_close(model.encode_image(images), loaded.model.encode_image(images), **TIGHT)
        assert_close(model.encode_text(tokens), loaded.model.encode_text(tokens), **TIGHT)
    from PIL import Image

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), np.uint8))
    assert torch.equal(preprocess(picture), loaded.preprocess(picture))  # resize + crop + norm
    again = load_model(model=f"local-dir:{out}")
    with torch.no_grad():
        assert_close(again.model.encode_image(images), loaded.model.encode_image(images), **TIGHT)
    assert again.sha256 is not None and again.sha256 != loaded.sha256
