import os

import pytest
import torch

# Tests run under `pytest -n 2` on 2 cores: one thread per worker.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # an in-process command may have set its own thread count


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small built-in demo dataset, written once per test worker."""
    from clipkit.data.demo import write_demo

    root = tmp_path_factory.mktemp("demo")
    write_demo(
        root,
        seed=0,
        train_samples=512,
        eval_samples=64,
        probe_train_samples=96,
        image_size=32,
        shard_size=128,
    )
    return root


# ---- evaluation tests (issue 3): one tiny trained checkpoint per test worker ----


@pytest.fixture(scope="session")
def tiny_checkpoint(demo_root, tmp_path_factory):
    """A run directory holding a `test`-preset CLIP trained for 12 steps on the demo train split."""
    from clipkit.config import Config
    from clipkit.train.run import pretrain

    run = tmp_path_factory.mktemp("eval-run") / "run"
    cfg = Config.from_dict(
        {
            "data": {"data": str(demo_root / "train"), "batch_size": 32, "workers": 1},
            "model": {"name": "test"},
            "optim": {"lr": 1e-3, "warmup": 2},
            "run": {"out": str(run), "steps": 12, "seed": 0, "device": "cpu", "threads": 1},
        }
    )
    pretrain(cfg)
    return run


@pytest.fixture(scope="session")
def folder_set(demo_root, tmp_path_factory):
    """The demo shape task as ImageFolder trees (train/ and test/), from its wds shards."""
    from clipkit.data.eval_io import iter_tar_samples

    root = tmp_path_factory.mktemp("folder")
    classes = (demo_root / "zeroshot/shape/classnames.txt").read_text().split()
    for split in ("train", "test"):
        for shard in sorted((demo_root / "zeroshot/shape" / split).glob("*.tar")):
            for key, fields in iter_tar_samples(str(shard)):
                folder = root / split / classes[int(fields["cls"])]
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{key}.png").write_bytes(fields["png"])
    return root
