"""Evaluation during training (`InTrainingEval`): the numbers equal the stand-alone commands' on
the same checkpoint, EMA weights are evaluated too, 2 gloo ranks equal 1 process, and a failing
evaluation (a corrupt shard, a fault on one rank only) gives an error record on every rank."""

import json
import logging
import math
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from cli_util import run

from clipkit.distributed import DistInfo
from clipkit.eval import LoaderSettings
from clipkit.eval.specs import metric_key, parse_specs

TOL = 1e-6
READING = LoaderSettings(batch_size=16, workers=0)


def build_eval(checkpoint, texts, out, info=DistInfo()):
    """(InTrainingEval, method) for the method saved in `checkpoint`, writing under `out`."""
    from clipkit.data.tokenize import build_tokenizer
    from clipkit.data.transforms import eval_transform
    from clipkit.eval.in_training import InTrainingEval
    from clipkit.methods.restore import load_method
    from clipkit.models import factory

    loaded = load_method(checkpoint)
    arch = loaded.config.model.arch
    evaluator = InTrainingEval(
        parse_specs(texts),
        READING,
        eval_transform(factory.preprocess(arch)),
        build_tokenizer(factory.preprocess(arch)),
        torch.device("cpu"),
        info,
        out,
        model_name=loaded.config.model.name,
        arch=arch,
        data_config=loaded.config.data,
    )
    return evaluator, loaded.method


def cli_metrics(tmp_path, name, *args):
    """The metrics `clipkit ARGS -o FILE` writes."""
    out = tmp_path / f"{name}.json"
    code, stdout, stderr = run(*args, "--device", "cpu", "--workers", "0", "-o", out)
    assert code == 0, stdout + stderr
    return json.loads(out.read_text())["metrics"]


def assert_metrics_equal(record, name, weights, metrics):
    assert record["eval"] == name and record["weights"] == weights and "error" not in record
    for metric, want in metrics.items():
        got = record[metric_key(name, metric, weights)]
        if want is None or (isinstance(want, float) and math.isnan(want)):
            assert got is None, metric
        else:
            assert got == pytest.approx(want, abs=TOL), (name, metric)


@pytest.mark.slow
def test_equals_the_standalone_commands(tiny_checkpoint, demo_root, folder_set, tmp_path):
    ckpt = str(tiny_checkpoint)
    texts = [
        f"zs=zero-shot:demo:{demo_root}",
        f"folder=zero-shot:folder:{folder_set},split=test",
        f"r=retrieval:{demo_root}/eval,ks=1-5-10",
        f"lp=probe:demo:{demo_root},sweep=full",
    ]
    evaluator, method = build_eval(ckpt, texts, tmp_path / "run")
    method.train()
    records = evaluator.run(method, step=12, samples_seen=384)
    assert method.training  # back in training mode
    assert [(r["eval"], r["weights"], r["step"], r["samples_seen"]) for r in records] == [
        (name, "online", 12, 384) for name in ("zs", "folder", "r", "lp")
    ]
    model = ("--checkpoint", ckpt)
    want = {
        "zs": cli_metrics(tmp_path, "zs", "zero-shot", "demo", "--data-root", demo_root, *model),
        "folder": cli_metrics(
            tmp_path, "folder", "zero-shot", "folder", "--data-root", folder_set, *model
        ),
        "r": cli_metrics(
            tmp_path, "r", "retrieve", "eval", "--data", demo_root / "eval", "--k", "1,5,10", *model
        ),
        "lp": cli_metrics(
            tmp_path, "lp", "probe", "demo", "--data-root", demo_root, "--no-cache", *model
        ),
    }
    for record in records:
        assert_metrics_equal(record, record["eval"], "online", want[record["eval"]])
        assert record["eval_seconds"] > 0
    assert want["zs"]["acc1"] > 0 and want["r"]["image_retrieval_recall@10"] > 0
    for name, stand_alone in (("zs", "zs"), ("r", "r"), ("lp", "lp")):
        written = json.loads((tmp_path / "run/eval/step-12" / f"{name}.json").read_text())
        cli = json.loads((tmp_path / f"{stand_alone}.json").read_text())
        assert written["metrics"] == pytest.approx(cli["metrics"], abs=TOL, nan_ok=True)
        assert (written["dataset"], written["task"]) == (cli["dataset"], cli["task"])
        assert written["pretrained"] == str(tmp_path / "run")
        block = written["clipkit"]
        assert (block["step"], block["samples_seen"]) == (12, 384)
        assert block["checkpoint"] == str(tmp_path / "run")
        assert set(cli["clipkit"]) - set(block) <= {"checkpoint_sha256"}
        assert block["augment"] == cli["clipkit"]["augment"]
        assert block["augment"] == "clip (crop 0.9-1, no colour change)"


def test_aclip_gives_ema_records_equal_to_weights_ema(demo_root, tmp_path):
    from click.testing import CliRunner

    from clipkit.cli.main import cli

    ckpt = tmp_path / "aclip"
    args = [
        "pretrain", "--data", demo_root / "train", "--out", ckpt, "--method", "aclip",
        "--model", "test", "--image-size", "64", "--batch-size", "8", "--workers", "0",
        "--threads", "1", "--warmup", "1", "--steps", "2", "--ssl-hidden-dim", "32",
        "--ssl-embed-dim", "16",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    evaluator, method = build_eval(str(ckpt), [f"zs=zero-shot:demo:{demo_root}"], tmp_path / "run")
    records = evaluator.run(method, step=2, samples_seen=16)
    assert [r["weights"] for r in records] == ["online", "ema"]
    for record in records:
        which = record["weights"]
        want = cli_metrics(
            tmp_path, which, "zero-shot", "demo", "--data-root", demo_root,
            "--checkpoint", ckpt, "--weights", which,
        )  # fmt: skip
        assert_metrics_equal(record, "zs", which, want)
    ema = json.loads((tmp_path / "run/eval/step-2/zs.ema.json").read_text())
    assert ema["clipkit"]["weights"] == "ema"
    assert ema["metrics"]["acc1"] == pytest.approx(records[1]["eval/zs/ema/acc1"], abs=TOL)


@pytest.fixture
def faulty_sets(demo_root, tmp_path):
    """A copy of the demo shape set whose test shard is cut in half, and a sound copy (`flaky`)
    that one rank of the distributed test fails to read."""
    corrupt, flaky = tmp_path / "corrupt", tmp_path / "flaky"
    shutil.copytree(demo_root / "zeroshot/shape", corrupt)
    shutil.copytree(demo_root / "zeroshot/shape", flaky)
    shard = corrupt / "test/0.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return corrupt, flaky


def rank_specs(demo_root, folder_set, corrupt, flaky):
    return [
        f"bad=zero-shot:wds:{corrupt}",
        f"flaky=zero-shot:wds:{flaky}",
        f"zs=zero-shot:demo:{demo_root}",
        f"folder=zero-shot:folder:{folder_set}",
        f"r=retrieval:{demo_root}/eval",
        f"lp=probe:demo:{demo_root}",
    ]


def _rank_worker(rank, world, init_file, checkpoint, texts, out):
    import torch.distributed as dist

    from clipkit.eval.in_training import InTrainingEval

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    if rank == 1:  # this rank alone cannot read the `flaky` set
        labelled = InTrainingEval._labelled

        def failing(self, loaded, data):
            if "flaky" in data.root:
                raise OSError("flaky disk")
            return labelled(self, loaded, data)

        InTrainingEval._labelled = failing
    evaluator, method = build_eval(checkpoint, texts, f"{out}/run", DistInfo(rank, 0, world))
    records = evaluator.run(method, step=5, samples_seen=80)
    (out / f"rank{rank}.json").write_text(json.dumps(records))
    dist.destroy_process_group()


def without_time(records):
    return [{k: v for k, v in r.items() if k != "eval_seconds"} for r in records]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(
    tiny_checkpoint, demo_root, folder_set, faulty_sets, tmp_path, caplog
):
    texts = rank_specs(demo_root, folder_set, *faulty_sets)
    evaluator, method = build_eval(str(tiny_checkpoint), texts, tmp_path / "one")
    with caplog.at_level(logging.WARNING, logger="clipkit.eval.in_training"):
        single = evaluator.run(method, step=5, samples_seen=80)
    assert "damaged" in single[0]["error"] and "0.tar" in single[0]["error"]
    assert any(
        m.startswith("evaluation bad failed at step 5: DataReadError: ")
        and m.endswith("; training goes on")
        for m in caplog.messages
    )
    assert not (tmp_path / "one/eval/step-5/bad.json").exists()
    assert "error" not in single[1]  # one process reads `flaky` fine
    args = (2, str(tmp_path / "init"), str(tiny_checkpoint), texts, tmp_path)
    mp.spawn(_rank_worker, args=args, nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert without_time(ranks[0]) == without_time(ranks[1])
    got = ranks[0]
    assert [r["eval"] for r in got] == ["bad", "flaky", "zs", "folder", "r", "lp"]
    assert got[0]["error"] == single[0]["error"]
    assert got[1]["error"] == "OSError: flaky disk"
    for two, one in zip(got[2:], single[2:], strict=True):
        metrics = {k: v for k, v in one.items() if k.startswith("eval/")}
        assert metrics and {k: two[k] for k in metrics} == pytest.approx(metrics, abs=TOL)
    written = json.loads((tmp_path / "run/eval/step-5/lp.json").read_text())
    assert written["clipkit"]["probe_fit"]["refine_steps"] == 0  # the quick sweep


def split_shards(source, out, parts: int):
    """The samples of tar `source` re-written as `parts` tars under `out`."""
    import io
    import tarfile

    from clipkit.data.eval_io import iter_tar_samples

    samples = list(iter_tar_samples(str(source)))
    out.mkdir(parents=True)
    for p in range(parts):
        with tarfile.open(out / f"{p}.tar", "w") as tar:
            for key, fields in samples[p::parts]:
                for ext, data in fields.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return sorted(out.glob("*.tar"))


@pytest.mark.parametrize("kind", ["tars", "folder"])
def test_rank_shares_partition_the_set_in_read_order(demo_root, folder_set, tmp_path, kind):
    """Two ranks' shares hold every sample once; sorted by their tags they are the order one
    process reads the set in, whatever the loader workers (tars: 3 shards over 2 workers)."""
    from clipkit.data.eval_io import rank_share, tagged
    from clipkit.data.eval_sets import FolderImages, TarImages, collate_labelled
    from clipkit.eval.embed import make_loader

    def blank(image):
        return torch.zeros(1)

    if kind == "tars":
        shards = split_shards(demo_root / "zeroshot/shape/test/0.tar", tmp_path / "s", 3)
        dataset = TarImages([str(s) for s in shards], blank)
        whole = [name for _, _, name in dataset]  # one process, shard by shard
    else:
        files = sorted((folder_set / "test").rglob("*.png"))
        dataset = FolderImages([(str(f), i % 6) for i, f in enumerate(files)], blank)
        whole = [str(f) for f in files]
    seen = []
    for rank in range(2):
        loader = make_loader(rank_share(dataset, rank, 2), 5, 2, tagged(collate_labelled))
        seen += [pair for b in loader for pair in zip(b["order"], b["name"], strict=True)]
    assert len(whole) == 64 and len(seen) == 64
    assert [name for _, name in sorted(seen)] == whole
    if kind == "tars":  # what the tags are for: 2 workers interleave the shards' batches
        plain = [n for b in make_loader(dataset, 5, 2, collate_labelled) for n in b["name"]]
        assert sorted(plain) == sorted(whole) and plain != whole


def test_unwritable_results_are_a_warning(tiny_checkpoint, demo_root, tmp_path, caplog):
    """RUN/eval is a file: the results JSON cannot be written, the record still comes back."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run/eval").write_text("in the way")
    evaluator, method = build_eval(
        str(tiny_checkpoint), [f"zs=zero-shot:demo:{demo_root}"], tmp_path / "run"
    )
    with caplog.at_level(logging.WARNING, logger="clipkit.eval.in_training"):
        (record,) = evaluator.run(method, step=1, samples_seen=32)
    assert "error" not in record and 0 <= record["eval/zs/acc1"] <= 1
    assert [m for m in caplog.messages if m.startswith("evaluation zs at step 1: ")]
