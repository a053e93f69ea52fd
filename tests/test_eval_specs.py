"""`--eval SPEC` strings: the grammar, default names, option checks, metric names and keys."""

import subprocess
import sys

import pytest

from clipkit.config_types import ConfigError
from clipkit.eval.specs import metric_key, metric_keys, parse_spec, parse_specs


@pytest.fixture
def data(tmp_path):
    for folder in ("wds_cifar10", "demo_data/eval", "odd:dir,x"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "prompts.txt").write_text("a photo of a {c}.\n")
    return tmp_path


def test_grammar_and_default_names(data):
    spec = parse_spec(f"zero-shot:wds:{data}/wds_cifar10")
    assert (spec.name, spec.task, spec.dataset, spec.path) == (
        "zero-shot-cifar10",
        "zero-shot",
        "wds",
        f"{data}/wds_cifar10",
    )
    assert spec.options["split"] == "test" and spec.text == f"zero-shot:wds:{data}/wds_cifar10"
    named = parse_spec(f"shape=zero-shot:demo:{data}/demo_data,task=colour,split=val")
    assert (named.name, named.options["task"], named.options["split"]) == ("shape", "colour", "val")
    assert parse_spec(f"zero-shot:demo:{data}/demo_data").name == "zero-shot-demo_data-shape"
    retrieval = parse_spec(f"retrieval:{data}/demo_data/eval,ks=10-1-5-5")
    assert (retrieval.name, retrieval.dataset, retrieval.ks) == ("retrieval-eval", None, [1, 5, 10])
    probe = parse_spec(f"probe:folder:{data}/wds_cifar10,train-split=tr,sweep=full,seed=3")
    assert probe.options["train-split"] == "tr" and probe.options["test-split"] == "test"
    assert (probe.options["sweep"], probe.options["seed"]) == ("full", "3")
    assert parse_spec(f"probe:wds:{data}/wds_cifar10").options["sweep"] == "quick"
    with_files = parse_spec(f"zero-shot:folder:{data}/wds_cifar10,templates={data}/prompts.txt")
    assert with_files.options["templates"] == f"{data}/prompts.txt"


def test_a_folder_may_hold_colons_and_commas(data):
    spec = parse_spec(f"zero-shot:folder:{data}/odd:dir,x,split=val")
    assert spec.path == f"{data}/odd:dir,x" and spec.options["split"] == "val"
    assert spec.name == "zero-shot-odd_dir_x"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("classify:wds:{d}/wds_cifar10", "unknown task 'classify'; known: zero-shot, probe"),
        ("zero-shot:tfds:{d}/wds_cifar10", "unknown dataset 'tfds'; known: imagenet, folder"),
        ("zero-shot:{d}/wds_cifar10", "unknown dataset"),
        ("zero-shot:wds:{d}/missing", "data folder not found: {d}/missing"),
        ("retrieval:{d}/missing.tar", "data folder not found"),
        ("zero-shot:wds:{d}/wds_cifar10,k=5", "unknown option 'k' for zero-shot; known: split"),
        ("retrieval:{d}/wds_cifar10,split=", "option 'split' has no value"),
        ("zero-shot:wds:{d}/wds_cifar10,task=colour", "'task' applies to the demo dataset only"),
        ("zero-shot:demo:{d}/demo_data,task=size", "task must be one of shape, colour"),
        (
            "retrieval:{d}/wds_cifar10,ks=1,5",
            "ks must be whole numbers >= 1 joined by '-' (1-5-10), got '1,5'",
        ),
        ("retrieval:{d}/wds_cifar10,ks=0-5", "ks must be whole numbers >= 1 joined by '-'"),
        ("probe:wds:{d}/wds_cifar10,sweep=huge", "sweep must be one of quick, full"),
        ("probe:wds:{d}/wds_cifar10,val-fraction=1", "val-fraction must lie in (0, 1)"),
        ("probe:wds:{d}/wds_cifar10,seed=-1", "seed must be a whole number"),
        ("zero-shot:wds:{d}/wds_cifar10,templates={d}/no.txt", "templates file not found"),
        ("bad name=zero-shot:wds:{d}/wds_cifar10", "unknown task 'bad name=zero-shot'"),
        ("retrieval:", "no data folder given"),
        ("  ", "empty; expected [NAME=]TASK:SOURCE"),
    ],
)
def test_errors_are_one_line_naming_the_spec(data, spec, message):
    text = spec.format(d=data)
    with pytest.raises(ConfigError) as caught:
        parse_spec(text)
    error = str(caught.value)
    assert "\n" not in error and error.startswith(f"--eval {text.strip()!r}: ")
    assert message.format(d=data) in error


def test_duplicate_names_are_refused(data):
    wds = f"zero-shot:wds:{data}/wds_cifar10"
    with pytest.raises(ConfigError, match="the name 'zero-shot-cifar10' is taken by"):
        parse_specs([wds, f"{wds},split=val"])
    with pytest.raises(ConfigError, match="the name 'a' is taken"):
        parse_specs([f"a={wds}", f"a=retrieval:{data}/wds_cifar10"])
    assert [s.name for s in parse_specs([wds, f"val={wds},split=val"])] == [
        "zero-shot-cifar10",
        "val",
    ]


def test_metric_names_and_keys(data):
    zero_shot = parse_spec(f"zs=zero-shot:wds:{data}/wds_cifar10")
    probe = parse_spec(f"probe:wds:{data}/wds_cifar10")
    retrieval = parse_spec(f"r=retrieval:{data}/wds_cifar10,ks=5-1")
    assert zero_shot.metric_names() == ["acc1", "acc5", "mean_per_class_recall"]
    assert probe.metric_names() == ["lp_acc1", "lp_acc5", "lp_mean_per_class_recall"]
    assert retrieval.metric_names() == [
        "image_retrieval_recall@1",
        "text_retrieval_recall@1",
        "image_retrieval_recall@5",
        "text_retrieval_recall@5",
    ]
    assert metric_key("zs", "acc1") == "eval/zs/acc1"
    assert metric_key("zs", "acc1", "ema") == "eval/zs/ema/acc1"
    with pytest.raises(ValueError, match="weights must be one of online, ema"):
        metric_key("zs", "acc1", "teacher")
    assert metric_keys([zero_shot], ema=True) == [
        "eval/zs/acc1",
        "eval/zs/acc5",
        "eval/zs/mean_per_class_recall",
        "eval/zs/ema/acc1",
        "eval/zs/ema/acc5",
        "eval/zs/ema/mean_per_class_recall",
    ]
    assert len(metric_keys([zero_shot, probe, retrieval])) == 3 + 3 + 4


def test_specs_import_no_torch_and_name_the_eval_datasets():
    code = "import sys, clipkit.eval.specs; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    from clipkit.data.eval_sets import DATASETS
    from clipkit.eval.specs import DATASETS as SPEC_DATASETS

    assert SPEC_DATASETS == DATASETS


def test_specs_pickle_and_convert_to_plain_data(data):
    """Specs travel to spawned ranks and into saved configs."""
    import dataclasses
    import pickle

    spec = parse_spec(f"r=retrieval:{data}/wds_cifar10,ks=1-5")
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert dataclasses.asdict(spec)["options"] == {"split": "test", "ks": "1-5"}
