"""Issue 14, evaluation inputs: every fault class ends in one `error:` line and exit 2 (or a
warning line and exit 0), never a traceback. Classes: damaged index directories, an index whose
checkpoint changed, damaged or empty evaluation data and class / template files, out-of-range
options, impossible model configs, inspect's --out; plus the probe cache rebuild, data check's
report of damaged shards, and CLIP_benchmark's dataset names in results."""

import io
import json
import shutil
import tarfile

import pytest
from cli_util import invoke, user_error


def warned(*args) -> str:
    """The stderr of a command that must succeed with one `warning:` line and no error."""
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "error:" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("warning:")]) == 1
    return result.stderr


def corrupt_header(tar_path, member: int = 1) -> None:
    """Overwrite the header block of the `member`-th member (its checksum no longer holds)."""
    with tarfile.open(tar_path) as tar:
        offset = tar.getmembers()[member].offset
    with open(tar_path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 512)


def truncate(tar_path, fraction: float = 0.4) -> None:
    data = tar_path.read_bytes()
    tar_path.write_bytes(data[: int(len(data) * fraction)])


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return str(tiny_checkpoint)


@pytest.fixture(scope="module")
def index_dir(ckpt, demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults-index") / "idx"
    args = ["retrieve", "index", "--checkpoint", ckpt, "--data", demo_root / "eval", "--out", out]
    assert invoke(*args, "--workers", 0).exit_code == 0
    return out


# ---- damaged index directories ----


def _garbage(p):
    p.write_bytes(b"garbage, not a faiss index")


def _cut(p):
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])


def _fewer_rows(p):
    p.write_text("\n".join(p.read_text().splitlines()[:10]) + "\n")


@pytest.mark.parametrize(
    "name, damage, needle",
    [
        ("image.index", _garbage, "not a readable faiss index"),
        ("image.index", _cut, "not a readable faiss index (truncated)"),
        ("metadata.jsonl", _cut, "is not a metadata record"),
        ("metadata.jsonl", _fewer_rows, "has 10 rows but the index holds 64"),
        ("metadata.jsonl", lambda p: p.write_bytes(b"\xff\xfe{"), "cannot be read"),
        ("model.json", lambda p: p.write_text('{"checkp'), "is not readable JSON"),
        ("model.json", lambda p: p.write_text("[]"), "lacks checkpoint"),
        ("model.json", lambda p: p.unlink(), "not a clipkit index directory"),
        ("image.index", lambda p: p.unlink(), "not a clipkit index directory"),
    ],
)
def test_damaged_index_dir_is_one_line(index_dir, tmp_path, name, damage, needle):
    idx = tmp_path / "idx"
    shutil.copytree(index_dir, idx)
    damage(idx / name)
    line = user_error("retrieve", "search", "--index", idx, "--text", "a red star")
    assert needle in line
    if "rebuild" in line:
        assert f"--out {idx} --overwrite" in line


def test_damaged_report_json_does_not_block_search(index_dir, tmp_path):
    idx = tmp_path / "idx"
    shutil.copytree(index_dir, idx)
    (idx / "report.json").write_text("{")
    assert invoke("retrieve", "search", "--index", idx, "--text", "a star", "-k", 2).exit_code == 0


# ---- an index whose checkpoint has changed since it was built ----


def test_changed_checkpoint_is_refused_unless_allowed(ckpt, demo_root, tmp_path):
    from clipkit import checkpoint

    run = tmp_path / "run"
    shutil.copytree(ckpt, run)
    idx = tmp_path / "idx"
    args = ["retrieve", "index", "--checkpoint", run, "--data", demo_root / "eval", "--out", idx]
    assert invoke(*args, "--workers", 0).exit_code == 0
    search = ["retrieve", "search", "--index", idx, "--text", "a red star", "-k", 3]
    assert invoke(*search).stderr == ""  # unchanged: no word
    original = tmp_path / "original.pt"
    shutil.copy(run / "checkpoints" / "latest.pt", original)
    # "Trained further": the same file, other weights.
    state = checkpoint.load(run)
    state["model"] = {
        k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()
    }
    checkpoint.save(state, run / "checkpoints" / "latest.pt")

    line = user_error(*search)
    assert "has changed since the index was built" in line
    assert "--allow-checkpoint-mismatch" in line and "--overwrite" in line
    err = warned(*search, "--allow-checkpoint-mismatch")
    assert "searching with the new weights" in err
    # An explicit --checkpoint is the user's choice: allowed, but said when it differs.
    assert "not the checkpoint the index was built with" in warned(*search, "--checkpoint", run)
    assert invoke(*search, "--checkpoint", original).stderr == ""


# ---- evaluation data, class names and templates ----


@pytest.fixture(scope="module")
def wds_faults(demo_root, tmp_path_factory):
    """Copies of the demo shape task (CLIP_benchmark wds layout), each with one fault."""
    base = demo_root / "zeroshot" / "shape"
    root = tmp_path_factory.mktemp("wds-faults")

    def variant(name, damage):
        shutil.copytree(base, root / name)
        damage(sorted((root / name / "test").glob("*.tar"))[0])

    def bad_labels(shard):
        out = shard.with_suffix(".new")
        with tarfile.open(shard) as src, tarfile.open(out, "w") as dst:
            for member in src:
                data = src.extractfile(member).read()
                data = b"cat" if member.name.endswith(".cls") else data
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
        out.replace(shard)

    def empty(shard):
        for other in shard.parent.glob("*.tar"):
            other.unlink()
        tarfile.open(shard, "w").close()  # a valid tar with zero members

    variant("corrupt-header", corrupt_header)
    variant("truncated", truncate)
    variant("bad-cls", bad_labels)
    variant("empty", empty)
    files = root / "files"
    files.mkdir()
    (files / "nonutf8.txt").write_bytes(b"circle\n\xff\xfesquare\n")
    (files / "empty.txt").write_text("\n \n")
    (files / "label.txt").write_text("a photo of a {label}.\n")
    (files / "positional.txt").write_text("a photo of a {c} {0}.\n")
    (files / "brace.txt").write_text("a photo of a {c.\n")
    (files / "attribute.txt").write_text("a photo of a {c.__class__}.\n")
    return root


@pytest.mark.parametrize(
    "data, extra, needle",
    [
        ("corrupt-header", [], "is damaged: unreadable from byte 1,536"),
        ("truncated", [], "is damaged"),
        ("bad-cls", [], "its cls is not an integer"),
        ("empty", [], "no samples found in"),
        (None, ["--classnames", "{files}/nonutf8.txt"], "is not UTF-8 text"),
        (None, ["--classnames", "{files}/empty.txt"], "is empty"),
        (None, ["--classnames", "{files}/missing.txt"], "not found: {files}/missing.txt"),
        (None, ["--templates", "{files}/empty.txt"], "templates file"),
        (None, ["--templates", "{files}/label.txt"], "has the field {label}"),
        (None, ["--templates", "{files}/positional.txt"], "has the field {0}"),
        (None, ["--templates", "{files}/brace.txt"], "is not a format string"),
        (None, ["--templates", "{files}/attribute.txt"], "has the field {c.__class__}"),
    ],
)
def test_bad_evaluation_data_is_one_line(ckpt, demo_root, wds_faults, data, extra, needle):
    root = wds_faults / data if data else demo_root / "zeroshot" / "shape"
    files = str(wds_faults / "files")
    extra = [a.format(files=files) for a in extra]
    args = ["zero-shot", "wds", "--data-root", root, "--checkpoint", ckpt, "--workers", 0]
    assert needle.replace("{files}", files) in user_error(*args, *extra)


def test_damaged_shard_is_one_line_from_a_worker(ckpt, wds_faults):
    """Raised in a DataLoader worker, the error still reaches the user as one line."""
    args = ["--data-root", wds_faults / "corrupt-header", "--checkpoint", ckpt, "--workers", 1]
    assert "is damaged" in user_error("zero-shot", "wds", *args)


def test_bad_retrieval_data_is_one_line(ckpt, wds_faults, tmp_path):
    for data, needle in (("corrupt-header", "is damaged"), ("empty", "no samples found")):
        args = ["--checkpoint", ckpt, "--data", wds_faults / data, "--workers", 0]
        assert needle in user_error("retrieve", "eval", *args)
        assert needle in user_error("retrieve", "index", *args, "--out", tmp_path / data)
        assert not (tmp_path / data).exists()


# ---- options out of range (refused before any work, by click's one-line path) ----

ZS = ["zero-shot", "demo", "--data-root", "{demo}", "--checkpoint", "{ckpt}"]
PROBE = ["probe", "demo", "--data-root", "{demo}", "--checkpoint", "{ckpt}"]
R_EVAL = ["retrieve", "eval", "--checkpoint", "{ckpt}", "--data", "{demo}/eval"]
R_INDEX = ["retrieve", "index", "--checkpoint", "{ckpt}", "--data", "{demo}/eval", "--out", "x"]


@pytest.mark.parametrize(
    "args, needle",
    [
        ([*ZS, "--batch-size", 0], "'--batch-size': 0 is not in the range x>=1"),
        ([*ZS, "--batch-size", -4], "'--batch-size'"),
        ([*ZS, "--workers", -1], "'--workers'"),
        ([*ZS, "--max-bad-fraction", 1.5], "'--max-bad-fraction'"),
        ([*ZS, "--max-bad-fraction", "nan"], "is not a finite number"),
        ([*PROBE, "--batch-size", 0], "'--batch-size'"),
        ([*PROBE, "--val-fraction", 1.5], "'--val-fraction': 1.5 is not in the range 0<x<1"),
        ([*PROBE, "--val-fraction", 0], "'--val-fraction'"),
        ([*PROBE, "--seeds", 0], "'--seeds'"),
        ([*PROBE, "--shots", 0], "'--shots'"),
        ([*PROBE, "--shots", -3], "'--shots'"),
        ([*PROBE, "--seed", -1], "'--seed'"),
        ([*PROBE, "--method", "vqt", "--vqt-batch-size", 0], "'--vqt-batch-size'"),
        ([*PROBE, "--method", "vqt", "--vqt-lr", "inf"], "'--vqt-lr'"),
        ([*PROBE, "--method", "vqt", "--vqt-epochs", 0], "'--vqt-epochs'"),
        ([*R_EVAL, "--k", "0,5"], "--k values must be >= 1"),
        ([*R_EVAL, "--batch-size", 0], "'--batch-size'"),
        ([*R_INDEX, "--target-recall", 1.5], "'--target-recall'"),
        ([*R_INDEX, "--seed", -2], "'--seed'"),
        (["retrieve", "search", "--index", "{demo}", "--text", "x", "-k", 0], "'-k'"),
        (["models", "test", "--image-size", 0], "'--image-size'"),
        (["models", "test", "--context-length", -5], "'--context-length'"),
        (["data", "check", "{demo}/eval", "--max-pixels", 0], "'--max-pixels'"),
    ],
)
def test_out_of_range_options(ckpt, demo_root, args, needle):
    args = [str(a).format(demo=demo_root, ckpt=ckpt) for a in args]
    assert needle in user_error(*args)


# ---- model configs that cannot make a sound model ----


def _json(tmp_path, body) -> str:
    path = tmp_path / "model.json"
    path.write_text(json.dumps(body))
    return str(path)


def _test_arch(**vision):
    from clipkit.config import ModelConfig
    from clipkit.models import factory

    cfg = dict(factory.resolve_arch(ModelConfig(name="test"))["model_cfg"])
    cfg["vision_cfg"] = {**cfg["vision_cfg"], **vision}
    return cfg


@pytest.mark.parametrize(
    "args, needle",
    [
        (["test", "--image-size", 30], "image size 30 is not a multiple of the patch size 8"),
        (["msclip-tiny", "--image-size", 33], "multiple of patch_size"),
        ([{"vision": {"width": -32}}], "vision_cfg.width must be a positive integer, got -32"),
        ([{"vision": {"layers": 0}}], "vision_cfg.layers must be a positive integer"),
        ([{"vision": {"patch_size": 0}}], "vision_cfg.patch_size must be a positive integer"),
        ([{"vision": {"image_size": "big"}}], "vision_cfg.image_size must be a positive integer"),
        ([{"vision": {"mlp_ratio": -1.0}}], "mlp_ratio must be a positive number"),
        ([{"vision": {"unknown_key": 1}}], "cannot be built (TypeError"),
        ([{"msclip": {"heads": 0}}], "heads must be a positive integer"),
        ([[1, 2]], "must hold a JSON object"),
    ],
)
def test_bad_model_configs(tmp_path, args, needle):
    spec = args[0]
    if isinstance(spec, dict) and "vision" in spec:
        args = [_json(tmp_path, _test_arch(**spec["vision"]))]
    elif isinstance(spec, dict):
        args = [_json(tmp_path, {"family": "msclip", "config": spec["msclip"]})]
    elif isinstance(spec, list):
        args = [_json(tmp_path, spec)]
    assert needle in user_error("models", *args)


@pytest.mark.parametrize(
    "override", [{"image_size": 0}, {"image_size": 30}, {"context_length": -1}]
)
def test_model_building_checks_overrides(override):
    """`--image-size 0` was ignored (falsy) and 30 built a ViT that drops border pixels."""
    from clipkit.config import ConfigError, ModelConfig
    from clipkit.models import factory

    with pytest.raises(ConfigError):
        factory.build(ModelConfig(name="test", **override))


# ---- inspect masks: --out ----


def test_inspect_out_checked_before_work(ckpt, demo_root, tmp_path):
    (tmp_path / "a-file").write_text("x")
    base = ["inspect", "masks", "--checkpoint", ckpt, "--data", demo_root / "eval"]
    assert "not a directory" in user_error(*base, "--out", tmp_path / "a-file" / "m.png")
    assert "is a folder" in user_error(*base, "--out", tmp_path)
    assert "'--n'" in user_error(*base, "--out", tmp_path / "m.png", "--n", 0)
    assert "unknown device" in user_error(*base, "--out", tmp_path / "m.png", "--device", "tpu")


# ---- probe: a damaged feature cache is rebuilt ----


def test_damaged_probe_cache_is_rebuilt_with_the_same_metrics(ckpt, demo_root, tmp_path, caplog):
    args = ["probe", "demo", "--data-root", demo_root, "--checkpoint", ckpt, "--workers", 0]
    args += ["--cache-dir", tmp_path / "cache"]
    assert invoke(*args, "-o", tmp_path / "a.json").exit_code == 0
    entries = sorted((tmp_path / "cache").glob("*.npz"))
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # truncated
    entries[1].write_bytes(b"not an npz file")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert invoke(*args, "-o", tmp_path / "b.json").exit_code == 0
    rebuilt = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(rebuilt) == 2 and all("recomputing it" in m for m in rebuilt)
    assert all("pickle" not in m for m in rebuilt)  # numpy's advice is not relayed
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["metrics"] == b["metrics"]
    assert invoke(*args, "-o", tmp_path / "c.json").exit_code == 0  # the rebuilt cache reads


# ---- data check: damaged shards are reported, never a silent short count ----


def _check(folder):
    result = invoke("data", "check", folder, "--json", "--no-sizes")
    return result, json.loads(result.stdout[result.stdout.index("{") :])


def test_data_check_reports_a_corrupt_second_header(demo_root, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    shutil.copy(demo_root / "train" / "shard-000001.tar", folder / "good.tar")
    shutil.copy(demo_root / "train" / "shard-000000.tar", folder / "bad.tar")
    corrupt_header(folder / "bad.tar")  # the caption of sample 0: the rest is unreadable
    result, report = _check(folder)
    assert result.exit_code == 0
    assert report["samples"] == 128 and report["bad_by_reason"] == {"unreadable_shard": 128}
    (damage,) = report["unreadable_shards"]
    assert damage["shard"] == str(folder / "bad.tar") and damage["after_samples"] == 0
    assert damage["samples_lost"] == 128 and damage["exact"] and damage["offset"] > 0
    assert report["worst_shards"] == [[str(folder / "bad.tar"), 128]]
    text = invoke("data", "check", folder, "--no-sizes").stdout
    assert "unreadable: " in text and "(128 sample(s) lost)" in text
    assert "worst shards: bad.tar (128)" in text


def test_data_check_reports_a_truncated_tar(demo_root, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    shutil.copy(demo_root / "train" / "shard-000000.tar", folder / "cut.tar")
    truncate(folder / "cut.tar")
    result, report = _check(folder)
    assert result.exit_code == 0
    (damage,) = report["unreadable_shards"]
    lost = damage["samples_lost"]
    assert lost >= 1 and not damage["exact"]  # what lay beyond the cut is unknown
    assert report["samples"] == damage["after_samples"] > 0
    assert report["bad_by_reason"] == {"unreadable_shard": lost}
    assert report["worst_shards"] == [[str(folder / "cut.tar"), lost]]
    text = invoke("data", "check", folder, "--no-sizes").stdout
    assert f"at least {lost} sample(s) lost" in text


def test_data_check_with_no_usable_sample_fails(tmp_path, demo_root):
    folder = tmp_path / "shards"
    folder.mkdir()
    tarfile.open(folder / "empty.tar", "w").close()
    assert "no usable samples" in user_error("data", "check", folder, "--no-sizes")
    result = invoke("data", "check", folder, "--no-sizes")
    assert f"empty shard (no samples): {folder / 'empty.tar'}" in result.stdout


# ---- results name datasets as CLIP_benchmark does ----


@pytest.mark.parametrize(
    "folder, name",
    [
        ("wds_vtab-cifar10", "wds/vtab/cifar10"),
        ("wds_cifar10", "wds/cifar10"),
        ("wds_imagenet-a", "wds/imagenet-a"),
        ("wds_mscoco_captions", "wds/mscoco_captions"),
        ("cifar10", "wds/cifar10"),
    ],
)
def test_wds_dataset_names(tmp_path, folder, name):
    from clipkit.data.names import wds_dataset_name

    assert wds_dataset_name(tmp_path / folder) == name


def test_results_carry_dataset_names_not_paths(ckpt, demo_root, tmp_path):
    root = tmp_path / "wds_vtab-shapes"
    shutil.copytree(demo_root / "zeroshot" / "shape", root)
    zs = ["zero-shot", "wds", "--data-root", root, "--checkpoint", ckpt, "--workers", 0]
    assert invoke(*zs, "-o", tmp_path / "zs.json").exit_code == 0
    assert json.loads((tmp_path / "zs.json").read_text())["dataset"] == "wds/vtab/shapes"
    r = ["retrieve", "eval", "--checkpoint", ckpt, "--data", demo_root / "eval", "--workers", 0]
    assert invoke(*r, "-o", tmp_path / "r.json").exit_code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["dataset"] == "eval" and result["clipkit"]["data_root"] == str(demo_root / "eval")


def test_index_file_error_is_a_value_error(tmp_path):
    from clipkit import index as ix

    (tmp_path / "x.index").write_bytes(b"\x00" * 10)
    with pytest.raises(ix.IndexFileError, match="not a readable faiss index"):
        ix.load_index(tmp_path / "x.index")
