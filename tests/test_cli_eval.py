"""Every evaluation command through the CLI on a tiny trained checkpoint, and every user error:
exit code 2, one line, no traceback, nothing half-written."""

import json
import shutil

import pytest
import torch
from cli_util import run, user_error
from PIL import Image


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return str(tiny_checkpoint)


def test_help_of_every_command():
    for args in (
        ["zero-shot"],
        ["probe"],
        ["export"],
        ["retrieve"],
        ["retrieve", "index"],
        ["retrieve", "search"],
        ["retrieve", "eval"],
    ):
        code, out, _ = run(*args, "--help")
        assert code == 0 and "Usage" in out, args


def test_zero_shot_demo_and_export_give_identical_results(ckpt, demo_root, tmp_path):
    code, out, err = run(
        "zero-shot",
        "demo",
        "--data-root",
        demo_root,
        "--checkpoint",
        ckpt,
        "--workers",
        0,
        "-o",
        tmp_path / "a.json",
    )
    assert code == 0, err
    assert "acc1" in out and "mean_per_class_recall" in out
    a = json.loads((tmp_path / "a.json").read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics", "language", "clipkit"} <= set(a)
    assert a["task"] == "zeroshot_classification" and a["clipkit"]["num_samples"] == 64
    assert len(a["clipkit"]["checkpoint_sha256"]) == 64 and a["clipkit"]["templates"]
    assert run("export", "--checkpoint", ckpt, "--out", tmp_path / "oc")[0] == 0
    code, _, err = run(
        "zero-shot",
        "demo",
        "--data-root",
        demo_root,
        "--model",
        f"local-dir:{tmp_path / 'oc'}",
        "--workers",
        0,
        "-o",
        tmp_path / "b.json",
    )
    assert code == 0, err
    b = json.loads((tmp_path / "b.json").read_text())
    assert a["metrics"] == b["metrics"]
    assert "already exists" in user_error("export", "--checkpoint", ckpt, "--out", tmp_path / "oc")


def test_zero_shot_wds_and_folder_agree(ckpt, demo_root, folder_set, tmp_path):
    wds = demo_root / "zeroshot/shape"
    templates = wds / "zeroshot_classification_templates.txt"
    results = []
    for args in (
        ["wds", "--data-root", wds],
        ["folder", "--data-root", folder_set, "--templates", templates],
    ):
        out = tmp_path / f"{args[0]}.json"
        code, _, err = run("zero-shot", *args, "--checkpoint", ckpt, "--workers", 0, "-o", out)
        assert code == 0, err
        results.append(json.loads(out.read_text()))
    # Same images and templates; the folder's classes are its sorted folder names (another
    # order than classnames.txt), which must not change the numbers.
    assert sorted(results[0]["clipkit"]["classnames"]) == results[1]["clipkit"]["classnames"]
    assert results[0]["metrics"] == pytest.approx(results[1]["metrics"], abs=1e-6)


def test_folder_with_unreadable_images(ckpt, folder_set, tmp_path):
    root = tmp_path / "f"
    shutil.copytree(folder_set, root)
    (root / "test/circle/broken.png").write_bytes(b"not an image")
    args = ["zero-shot", "folder", "--data-root", root, "--checkpoint", ckpt, "--workers", 0]
    line = user_error(*args, "-o", tmp_path / "r.json")  # 1 of 65 > 1% default
    assert "broken.png" in line and not (tmp_path / "r.json").exists()
    code, _, err = run(*args, "--max-bad-fraction", 0.05, "-o", tmp_path / "r.json")
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["clipkit"]["skipped_images"] == 1


def test_retrieve_index_search_eval(ckpt, demo_root, tmp_path):
    idx = tmp_path / "idx"
    code, out, err = run(
        "retrieve",
        "index",
        "--checkpoint",
        ckpt,
        "--data",
        demo_root / "eval",
        "--out",
        idx,
        "--workers",
        0,
        "--max-memory",
        "1GB",
    )
    assert code == 0, err
    report = json.loads((idx / "report.json").read_text())
    assert report["kind"] == "flat" and report["ntotal"] == 64 and report["recall@10"] == 1.0
    assert {"size_bytes", "build_seconds", "median_query_ms"} <= set(report)
    meta = [json.loads(line) for line in (idx / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 64 and meta[0]["caption"] and meta[0]["source"].endswith(".tar")

    code, out, err = run(
        "retrieve",
        "search",
        "--index",
        idx,
        "--text",
        "a red star",
        "-k",
        5,
        "--json",
        "--html",
        tmp_path / "g.html",
    )
    assert code == 0, err
    hits = json.loads(out)["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:], strict=False))
    page = (tmp_path / "g.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and hits[0]["caption"][:20] in page
    # Brute force agrees with the flat index.
    import numpy as np

    from clipkit.eval.embed import encode_texts
    from clipkit.eval.loading import load_model

    loaded = load_model(checkpoint=ckpt)
    q = encode_texts(loaded.model, loaded.tokenizer, ["a red star"], torch.device("cpu")).numpy()
    scores = np.load(idx / "image_embeddings.npy") @ q[0]
    assert [h["row"] for h in hits] == list(np.argsort(-scores)[:5])

    image = tmp_path / "q.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(image)
    code, out, err = run("retrieve", "search", "--index", idx, "--image", image, "-k", 3)
    assert code == 0 and len(out.strip().splitlines()) == 3, err

    code, out, err = run(
        "retrieve",
        "eval",
        "--checkpoint",
        ckpt,
        "--data",
        demo_root / "eval",
        "--workers",
        0,
        "--k",
        "1,5",
        "-o",
        tmp_path / "r.json",
    )
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["metrics"]) == {
        f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5)
    }
    assert r["clipkit"]["index_metrics"] == r["metrics"]  # flat index under 10k vectors


def test_probe_cli(ckpt, demo_root, folder_set, tmp_path):
    code, out, err = run(
        "probe",
        "demo",
        "--data-root",
        demo_root,
        "--checkpoint",
        ckpt,
        "--workers",
        0,
        "--cache-dir",
        tmp_path / "c",
        "-o",
        tmp_path / "p.json",
    )
    assert code == 0, err
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["task"] == "linear_probe" and 0 <= p["metrics"]["lp_acc1"] <= 1
    assert p["clipkit"]["num_train"] == 96 and len(list((tmp_path / "c").glob("*.npz"))) == 2
    code, out, err = run(
        "probe",
        "folder",
        "--data-root",
        folder_set,
        "--checkpoint",
        ckpt,
        "--workers",
        0,
        "--no-cache",
        "--shots",
        2,
        "--seeds",
        2,
        "-o",
        tmp_path / "f.json",
    )
    assert code == 0, err
    f = json.loads((tmp_path / "f.json").read_text())
    assert f["clipkit"]["fewshot_k"] == 2 and "lp_acc1_std" in f["metrics"]


def test_user_errors(ckpt, demo_root, tmp_path):
    zs = ["zero-shot", "demo", "--checkpoint", ckpt, "--workers", 0]
    assert "data root not found" in user_error(*zs, "--data-root", tmp_path / "nope")
    assert "zeroshot/shape" in user_error(*zs, "--data-root", tmp_path)
    line = user_error("zero-shot", "imagenet", "--data-root", demo_root, "--checkpoint", ckpt)
    assert "1000 synset folders" in line
    assert "CLIP_benchmark" in user_error(
        "zero-shot", "wds", "--data-root", demo_root, "--checkpoint", ckpt
    )
    assert "checkpoint not found" in user_error(
        *zs[:2], "--data-root", demo_root, "--checkpoint", tmp_path / "x.pt"
    )
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert "not a clipkit checkpoint" in user_error(
        "zero-shot", "demo", "--data-root", demo_root, "--checkpoint", tmp_path / "foreign.pt"
    )
    assert "keeps no EMA" in user_error(*zs, "--data-root", demo_root, "--weights", "ema")
    assert "either --checkpoint" in user_error("zero-shot", "demo", "--data-root", demo_root)
    probe = ["probe", "demo", "--data-root", demo_root, "--checkpoint", ckpt, "--workers", 0]
    assert "fewer than shots" in user_error(*probe, "--shots", 1000, "--no-cache")


def test_retrieve_user_errors(ckpt, demo_root, tmp_path):
    from clipkit import checkpoint
    from clipkit.config import Config
    from clipkit.models import factory

    idx = tmp_path / "idx"
    args = [
        "retrieve",
        "index",
        "--checkpoint",
        ckpt,
        "--data",
        demo_root / "eval",
        "--out",
        idx,
        "--workers",
        0,
    ]
    assert run(*args)[0] == 0
    assert "already exists" in user_error(*args)
    assert "--max-memory" in user_error(*args, "--overwrite", "--max-memory", "lots")
    search = ["retrieve", "search", "--index", idx]
    assert "larger than the index" in user_error(*search, "--text", "a star", "-k", 65)
    (tmp_path / "bad.png").write_bytes(b"junk")
    assert "cannot read the image" in user_error(*search, "--image", tmp_path / "bad.png")
    assert "exactly one of" in user_error(*search)
    assert "not a clipkit index" in user_error(
        "retrieve", "search", "--index", tmp_path, "--text", "x"
    )
    # A checkpoint with another embedding dimension (the `tiny` preset: 128 vs 32).
    cfg = Config.from_dict({"model": {"name": "tiny"}})
    model = factory.build(cfg.model)
    checkpoint.save(
        {"config": cfg.to_dict(), "model": model.state_dict(), "method_state": {}},
        tmp_path / "wide.pt",
    )
    line = user_error(*search, "--text", "a star", "--checkpoint", tmp_path / "wide.pt")
    assert "dimension 128" in line and "32" in line
    assert "expected img2dataset shards" in user_error(
        "retrieve", "eval", "--checkpoint", ckpt, "--data", tmp_path / "idx"
    )
