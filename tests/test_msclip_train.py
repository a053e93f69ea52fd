"""MS-CLIP through clipkit's optimizer, factory, CLI and DDP: shared-parameter lr/wd groups, the
weight-decay rule, official and clipkit weight files, checkpoint round trip, every tiny ablation
variant training, size overrides, and two gloo ranks (torchrun and a library-level equivalence)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner
from torch import nn

from clipkit import methods
from clipkit.config import ConfigError, MethodConfig, ModelConfig, OptimConfig
from clipkit.models.msclip import (
    MSCLIP,
    PRESETS,
    Attention,
    MSCLIPConfig,
    shared_parameter_names,
)
from clipkit.models.msclip_official import to_official_state_dict

TINY_VARIANTS = ["msclip-tiny-shared", "msclip-tiny-ln", "msclip-tiny-early", "msclip-tiny-branch"]
W = 64  # msclip-tiny width; 3 shared slots (1..3)
SHARED_PER_SLOT = 12 * W * W + 9 * W  # in_proj 3W^2+3W, out_proj W^2+W, c_fc 4W^2+4W, c_proj 4W^2+W


def _source_model(seed: int = 1, name: str = "msclip-tiny") -> MSCLIP:
    """A tiny MS-CLIP with non-default weights and BN running statistics (so buffers matter)."""
    torch.manual_seed(seed)
    model = MSCLIP(PRESETS[name])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
    return model


def _inputs(cfg: MSCLIPConfig, b: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    image = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    text = torch.randint(1, 1000, (b, cfg.context_length), generator=g)
    return image, text


@torch.no_grad()
def _outputs(model: nn.Module, cfg: MSCLIPConfig) -> dict:
    model.eval()
    return model(*_inputs(cfg))


def _assert_same_outputs(a: dict, b: dict) -> None:
    for key in ("image_features", "text_features", "logit_scale"):
        assert torch.equal(a[key], b[key]), key


# -- optimizer groups and the weight-decay rule ------------------------------------------------


def test_shared_parameters_get_their_own_lr_and_wd():
    from clipkit.train.optim import param_groups

    model = MSCLIP(PRESETS["msclip-tiny"])
    shared = model.shared_parameters()
    assert len(shared) == len({id(p) for p in shared}) == 8 * 3
    assert sum(p.numel() for p in shared) == 3 * SHARED_PER_SLOT == 149_184
    named = dict(model.named_parameters())
    assert {id(named[n]) for n in shared_parameter_names(model)} == {id(p) for p in shared}

    cfg = OptimConfig(lr=1e-3, shared_lr=1e-4, shared_weight_decay=0.0, weight_decay=0.2)
    method = methods.build(MethodConfig(name="clip"), model)
    for module in (model, method):  # the trainer hands the optimizer the method
        groups = param_groups(module, cfg, shared)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len(list(model.parameters()))
        low = [g for g in groups if g["lr_mult"] != 1.0]
        assert len(low) == 1
        assert low[0]["lr_mult"] == pytest.approx(0.1) and low[0]["weight_decay"] == 0.0
        assert {id(p) for p in low[0]["params"]} == {id(p) for p in shared}

    # with a non-zero shared decay, the shared biases still get none
    cfg = OptimConfig(lr=1e-3, shared_lr=1e-4, shared_weight_decay=0.3, weight_decay=0.2)
    by_key = {
        (g["lr_mult"], g["weight_decay"]): g["params"] for g in param_groups(model, cfg, shared)
    }
    assert sorted(by_key) == [(0.1, 0.0), (0.1, 0.3), (1.0, 0.0), (1.0, 0.2)]
    assert len(by_key[(0.1, 0.3)]) == 12 and all(p.ndim == 2 for p in by_key[(0.1, 0.3)])
    assert len(by_key[(0.1, 0.0)]) == 12 and all(p.ndim == 1 for p in by_key[(0.1, 0.0)])


def test_weight_decay_rule_for_msclip():
    """Decay only the matrices of Linear/Conv layers, attention in_proj and the two projections;
    never BN/LN gains and biases, biases, embeddings, class token or the temperature."""
    from clipkit.train.optim import decays

    model = MSCLIP(PRESETS["msclip-tiny"])
    named = dict(model.named_parameters())
    decayed = {id(p) for n, p in named.items() if decays(n, p)}
    mods = list(model.modules())
    expected = {id(m.weight) for m in mods if isinstance(m, (nn.Linear, nn.Conv2d))}
    expected |= {id(m.in_proj_weight) for m in mods if isinstance(m, Attention)}
    expected |= {id(model.visual.proj), id(model.text_projection)}
    assert decayed == expected
    norms = [m for m in mods if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))]
    # stem 1 + 4x2, branch 1 + 4x4, adapters 5x2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in norms) == 9 + 17 + 10
    assert not decayed & {id(p) for m in norms for p in m.parameters()}
    for name in (
        "positional_embedding",
        "visual.positional_embedding",
        "token_embedding.weight",
        "visual.class_embedding",
        "logit_scale",
        "visual.branch.0.bn.weight",
        "visual.branch.1.residual_bn.bias",
        "visual.stem.blocks.0.downsample.1.weight",  # a BN named only by its index
        "visual.adapters.2.token_bn.weight",
        "visual.adapters.2.ln.weight",
        "text_blocks.1.ln_1.weight",
        "visual.blocks.0.attn.in_proj_bias",
    ):
        assert not decays(name, named[name]), name
    for name in ("visual.stem.blocks.0.downsample.0.weight", "visual.adapters.0.branch_dw.weight"):
        assert decays(name, named[name]), name  # conv kernels do decay


# -- weight files: official and clipkit layouts ------------------------------------------------


def _save(obj, path):
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("wrap", ["plain", "state_dict+module", "model", "safetensors"])
def test_official_weights_file_builds_identical_model(tmp_path, wrap):
    from clipkit.models import factory

    src = _source_model()
    sd = to_official_state_dict(src)
    if wrap == "plain":
        path = _save(sd, tmp_path / "w.pth")
    elif wrap == "state_dict+module":
        path = _save(
            {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3},
            tmp_path / "w.pth",
        )
    elif wrap == "model":
        path = _save({"model": sd}, tmp_path / "w.pth")
    else:
        from safetensors.torch import save_file

        path = str(tmp_path / "w.safetensors")
        save_file({k: v.clone().contiguous() for k, v in sd.items()}, path)
    built = factory.build(ModelConfig(name="msclip-tiny", pretrained=path))
    _assert_same_outputs(_outputs(built, src.config), _outputs(src, src.config))
    mine, theirs = src.state_dict(), built.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert built.text_blocks[1].attn is built.visual.blocks[0].attn  # still tied


def test_clipkit_weights_file_and_report(tmp_path):
    src = _source_model()
    fresh = MSCLIP(PRESETS["msclip-tiny"])
    report = fresh.load_weights_file(_save(src.state_dict(), tmp_path / "w.pt"))
    assert report.layout == "clipkit" and report.tied_checked == 24
    assert report.missing_keys == report.unexpected_keys == []
    _assert_same_outputs(_outputs(fresh, src.config), _outputs(src, src.config))
    report = fresh.load_weights_file(_save(to_official_state_dict(src), tmp_path / "o.pt"))
    assert report.layout == "official" and report.tied_checked == 24


def _one_line_error(path: str, name: str = "msclip-tiny", **kw) -> str:
    from clipkit.models import factory

    with pytest.raises(ConfigError) as info:
        factory.build(ModelConfig(name=name, pretrained=path, **kw))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


class _NotATensor:
    pass


def test_mismatched_weights_files_are_refused(tmp_path):
    src = _source_model()
    sd = to_official_state_dict(src)
    bad = dict(sd)
    key = "transformer.resblocks.2.mlp.c_fc.weight"  # text copy of a shared tensor
    bad[key] = sd[key] + 1e-3
    msg = _one_line_error(_save(bad, tmp_path / "tied.pt"))
    assert "stored twice with different values" in msg and key in msg
    # nothing is written before every check passed
    target = MSCLIP(PRESETS["msclip-tiny"])
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ConfigError):
        target.load_weights_file(str(tmp_path / "tied.pt"))
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())

    other = to_official_state_dict(_source_model(name="msclip-tiny-ln"))
    assert "do not fit this config" in _one_line_error(_save(other, tmp_path / "ln.pt"))
    msg = _one_line_error(_save(sd, tmp_path / "ok.pt"), image_size=64)
    assert "visual.positional_embedding" in msg and "(17, 64)" in msg and "(65, 64)" in msg
    assert "safe load" in _one_line_error(_save({"x": _NotATensor()}, tmp_path / "obj.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "not a readable weights file" in _one_line_error(str(tmp_path / "junk.pt"))
    msg = _one_line_error(_save({"foo.weight": torch.zeros(1)}, tmp_path / "foreign.pt"))
    assert "neither a clipkit nor an official" in msg


# -- the CLI -----------------------------------------------------------------------------------


def _pretrain(demo_root, out, *args: str, steps: int = 2, workers: int = 0):
    from clipkit.cli.main import cli

    base = ["pretrain", "--data", str(demo_root / "train"), "--out", str(out)]
    base += ["--steps", str(steps), "--batch-size", "16", "--workers", str(workers)]
    base += ["--warmup", "2", "--log-every", "1", "--threads", "1"]
    return CliRunner().invoke(cli, [*base, *args])


def _finite_losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert losses and all(math.isfinite(x) for x in losses)
    return losses


def test_cli_pretrain_from_official_weights_and_checkpoint_round_trip(tmp_path, demo_root):
    from clipkit.models import factory

    src = _source_model()
    weights = _save(to_official_state_dict(src), tmp_path / "official.pth")
    out = tmp_path / "run"
    args = ["--model", "msclip-tiny", "--pretrained", weights, "--save-every", "1"]
    res = _pretrain(demo_root, out, *args, "--shared-lr", "5e-5", workers=1)
    assert res.exit_code == 0, res.output[-2000:]
    assert len(_finite_losses(out)) == 2
    ckpt = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["model"]["arch"]["family"] == "msclip"

    # started from the file: AdamW's first step moves a weight by at most lr * (1 + wd * |w|)
    # (lr 2.5e-4 in warmup, 2.5e-5 for shared weights, wd 0.2); a random init is ~1e-2 away
    first = torch.load(out / "checkpoints" / "step-1.pt", weights_only=True)["model"]
    start = src.state_dict()
    shared = set(shared_parameter_names(src))
    for name, _ in src.named_parameters():
        lr = 2.5e-5 if name in shared else 2.5e-4
        bound = lr * (1 + 0.2 * start[name].abs().max().item()) * 1.001
        assert (first[name] - start[name]).abs().max().item() <= bound, name
    moved = first["visual.blocks.0.mlp.c_fc.weight"] - start["visual.blocks.0.mlp.c_fc.weight"]
    assert moved.abs().max() > 1e-5

    # round trip through the checkpoint is exact, whichever way it is loaded
    arch = ckpt["config"]["model"]["arch"]
    fresh = factory.build_from_arch(arch)
    fresh.load_state_dict(ckpt["model"])  # what evaluation does
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in fresh.state_dict().items())
    sd = ckpt["model"]
    assert torch.equal(
        sd["text_blocks.1.attn.in_proj_weight"], sd["visual.blocks.0.attn.in_proj_weight"]
    )
    via_file = MSCLIP(MSCLIPConfig.from_dict(arch["config"]))
    via_file.load_weights_file(str(out / "checkpoints" / "latest.pt"))
    _assert_same_outputs(_outputs(fresh, src.config), _outputs(via_file, src.config))
    trained, start_out = _outputs(fresh, src.config), _outputs(src, src.config)
    assert not torch.equal(trained["image_features"], start_out["image_features"])  # it trained


def test_cli_refuses_mismatched_weights_with_one_line(tmp_path, demo_root):
    sd = to_official_state_dict(_source_model())
    sd["transformer.resblocks.3.attn.out_proj.bias"] = (
        sd["transformer.resblocks.3.attn.out_proj.bias"] + 1
    )
    weights = _save(sd, tmp_path / "bad.pth")
    res = _pretrain(demo_root, tmp_path / "run", "--model", "msclip-tiny", "--pretrained", weights)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MS-CLIP weights: shared tensor")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("name", TINY_VARIANTS)
def test_cli_ablation_variants_train(tmp_path, demo_root, name):
    out = tmp_path / "run"
    res = _pretrain(demo_root, out, "--model", name)
    assert res.exit_code == 0, res.output[-2000:]
    assert len(_finite_losses(out)) == 2
    ckpt = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert MSCLIPConfig.from_dict(ckpt["config"]["model"]["arch"]["config"]) == PRESETS[name]
    sd = ckpt["model"]
    tied_ln = torch.equal(sd["text_blocks.0.ln_1.weight"], sd["visual.blocks.0.ln_1.weight"])
    assert tied_ln == (name == "msclip-tiny-shared")  # trained LNs differ unless tied
    assert ("visual.stem.conv1.weight" in sd) == (name == "msclip-tiny-early")
    assert ("visual.branch.0.conv.weight" in sd) == (name == "msclip-tiny-branch")


def test_cli_image_size_and_context_length_overrides(tmp_path, demo_root):
    out = tmp_path / "run"
    args = ["--model", "msclip-tiny", "--image-size", "64", "--context-length", "8"]
    res = _pretrain(demo_root, out, *args, steps=1)
    assert res.exit_code == 0, res.output[-2000:]
    ckpt = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    cfg = ckpt["config"]["model"]["arch"]["config"]
    assert cfg["image_size"] == 64 and cfg["context_length"] == 8
    assert tuple(ckpt["model"]["visual.positional_embedding"].shape) == (65, 64)  # 8x8 + CLS
    assert tuple(ckpt["model"]["positional_embedding"].shape) == (8, 64)
    _finite_losses(out)


def test_torchrun_two_gloo_ranks(tmp_path, demo_root):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += ["-m", "clipkit", "pretrain", "--data", str(demo_root / "train"), "--out", str(out)]
    cmd += ["--model", "msclip-tiny", "--steps", "2", "--batch-size", "8", "--warmup", "1"]
    cmd += ["--workers", "1", "--threads", "1", "--log-every", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2
    assert ckpt["samples_seen"] == 2 * 8 * 2 and len(ckpt["data_position"]) == 2
    _finite_losses(out)


# -- two gloo ranks against one process --------------------------------------------------------


def _model_and_batch():
    torch.manual_seed(0)
    model = MSCLIP(PRESETS["msclip-tiny"])
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=g)
    text = torch.randint(1, 1000, (8, 16), generator=g)
    return model, images, text


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

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
    result = {"loss": total / world, "grads": _grads(method.module.model)}
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process_with_per_rank_batchnorm(tmp_path):
    """DDP on CPU normalises each rank's images with that rank's BN statistics (SyncBatchNorm
    needs CUDA), so the one-process reference encodes the images in the same two halves ("ghost
    batch norm") and the text whole; loss and gradients then match exactly. Full-batch BN
    statistics give a different loss: the test can tell the two apart."""
    from clipkit.losses import clip_loss

    # fork: the children inherit the imported modules (spawn would re-import torch twice)
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    model, images, text = _model_and_batch()
    ghost = torch.cat([model.encode_image(half, normalize=True) for half in images.chunk(2)])
    loss = clip_loss(ghost, model.encode_text(text, normalize=True), model.logit_scale.exp())
    loss.backward()
    ref = _grads(model)
    assert len(ref) == len(list(model.parameters()))
    with torch.no_grad():
        whole = model(images, text)
        full_bn = clip_loss(whole["image_features"], whole["text_features"], whole["logit_scale"])
    assert abs(full_bn.item() - loss.item()) > 1e-4
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"].item() == pytest.approx(loss.item(), abs=1e-6)
        assert set(got["grads"]) == set(ref)
        for name, g in ref.items():
            torch.testing.assert_close(got["grads"][name], g, atol=1e-6, rtol=1e-4, msg=name)
