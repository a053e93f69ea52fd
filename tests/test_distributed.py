"""Two gloo processes give the same loss and gradients as one process over the whole batch."""

import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from clipkit.config import MethodConfig, ModelConfig


def _model_and_batch():
    from clipkit.models import factory

    torch.manual_seed(0)
    model = factory.build(ModelConfig(name="test"))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=g)
    text = torch.randint(1, 1000, (8, 16), generator=g)
    return model, images, text


def _grads(method):
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from clipkit import methods

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, images, text = _model_and_batch()
    method = DDP(methods.build(MethodConfig(name="clip"), model))
    half = images.shape[0] // world
    sl = slice(rank * half, (rank + 1) * half)
    loss, _ = method({"image": images[sl], "text": text[sl]})
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.save({"loss": total / world, "grads": _grads(method.module)}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    from clipkit import methods

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model, images, text = _model_and_batch()
    method = methods.build(MethodConfig(name="clip"), model)
    loss, _ = method({"image": images, "text": text})
    loss.backward()
    ref = _grads(method)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"].item() == pytest.approx(loss.item(), abs=1e-6)
        assert set(got["grads"]) == set(ref)
        for name, g in ref.items():
            torch.testing.assert_close(got["grads"][name], g, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_torchrun_pretrain_two_ranks(tmp_path, demo_root):
    """`torchrun --nproc_per_node 2 -m clipkit pretrain` trains with DDP on gloo."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "clipkit",
        "pretrain",
        "--data",
        str(demo_root / "train"),
        "--out",
        str(out),
        "--model",
        "test",
        "--steps",
        "4",
        "--batch-size",
        "16",
        "--workers",
        "1",
        "--log-every",
        "2",
        "--threads",
        "1",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2
    assert ckpt["samples_seen"] == 4 * 16 * 2
    assert len(ckpt["data_position"]) == 2
