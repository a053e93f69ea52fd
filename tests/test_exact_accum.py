"""Exact (gradient-cached) accumulation: one step of K micro-batches has the gradient of the loss
over the whole K x B x world batch, for every method, in one process and over 2 gloo ranks.

References: for methods whose step is one computation over the batch (CLIP, MS-CLIP without
BatchNorm) the genuine single batch of 32; where randomness or per-micro-batch BatchNorm make
"one batch" a different computation (FLIP's and A-CLIP's token draws, BN in A-CLIP's heads and
MS-CLIP's branch), the definition: `embed` with a graph on each micro-batch from the same RNG
state, concatenated, the loss once, one backward."""

from contextlib import nullcontext

import pytest
import torch
import torch.multiprocessing as mp
from cli_util import invoke, user_error

from clipkit import checkpoint, methods
from clipkit.config import ConfigError, MethodConfig, ModelConfig
from clipkit.config_resume import with_legacy_defaults
from clipkit.losses import SIGLIP_INIT
from clipkit.methods.base import Method
from clipkit.train.accumulate import MicroSteps, check_accum_mode, exact_step, independent_step

MICRO, K = 8, 4
# case -> (method name, model preset, MethodConfig settings, whether one genuine batch of 32 is
# the reference); aclip-random draws its blocks at random (Table 2a), so replay matters.
CASES = {
    "clip": ("clip", "test", {}, True),
    "flip": ("flip", "test", {"mask_ratio": 0.5}, False),
    "msclip": ("clip", "msclip-tiny", {}, False),  # BatchNorm in the parallel branch
    "msclip-ln": ("clip", "msclip-tiny-ln", {}, True),  # no BatchNorm: one batch of 32
    "aclip": ("aclip", "test", {}, False),
    "aclip-random": ("aclip", "test", {"attentive": False}, False),
    "aclip-ssl-only": ("aclip", "test", {"clip_weight": 0.0}, False),  # DDP finds unused ones
    "aclip-eff": ("aclip-eff", "test", {}, False),
    "attmask-high": ("attmask-high", "test", {}, False),
}
SSL = {"ssl_hidden_dim": 32, "ssl_embed_dim": 16}


# SigLIP (arXiv 2303.15343): the pairwise sigmoid loss over the whole batch, with the model's
# learnable logit bias; the loss is one computation over the batch like CLIP's.
CASES.update(
    {
        "clip-siglip": ("clip", "test", {}, True),
        "flip-siglip": ("flip", "test", {"mask_ratio": 0.5}, False),
        "aclip-siglip": ("aclip", "test", {}, False),
    }
)
SIGLIP_MODEL = {"init_logit_scale": SIGLIP_INIT["logit_scale"], "init_logit_bias": -10.0}


def build(case: str) -> Method:
    from clipkit.models import factory

    name, preset, settings, _ = CASES[case]
    siglip = case.endswith("-siglip")
    torch.manual_seed(0)
    model = factory.build(ModelConfig(name=preset, **(SIGLIP_MODEL if siglip else {})))
    ssl = SSL if name in ("aclip", "aclip-eff", "attmask-high") else {}
    method = methods.build(MethodConfig.of(name, **ssl, **settings), model)
    if siglip:
        method.set_objectives("siglip")
    return method


def full_batch(method: Method, n: int = MICRO * K, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = 32
    batch = {"text": torch.randint(1, 1000, (n, 16), generator=g)}
    if not method.has_token_masks:
        batch["image"] = torch.randn(n, 3, size, size, generator=g)
        return batch
    views = method.settings.num_views
    teacher = method.teacher_size
    batch["views"] = torch.randn(views, n, 3, size, size, generator=g)
    batch["teacher_image"] = torch.randn(n, 3, teacher, teacher, generator=g)
    corner = torch.rand(n, views, 2, generator=g) * 0.4
    batch["boxes"] = torch.cat([corner, corner + 0.6], dim=-1)
    return batch


def split(batch: dict, parts: int) -> list[dict]:
    """Micro-batches of the batch, in order (views are (V, B, ...): split on dim 1)."""
    n = batch["text"].shape[0] // parts
    out = []
    for i in range(parts):
        rows = slice(i * n, (i + 1) * n)
        out.append({k: v[:, rows] if k == "views" else v[rows] for k, v in batch.items()})
    return out


def micro_steps(engine, method: Method, micro: list[dict], distributed: bool = False):
    def sync(all_reduce: bool):
        return nullcontext() if all_reduce or not distributed else engine.no_sync()

    return MicroSteps(
        engine=engine,
        method=method,
        count=len(micro),
        fetch=lambda i: micro[i],
        sync=sync,
        autocast=nullcontext,
        backward=lambda t: t.backward(),
        device=torch.device("cpu"),
    )


def grads(method: Method) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def buffers(method: Method) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in method.named_buffers()}


def definition_step(method: Method, micro: list[dict], seeds: list[int | None]) -> torch.Tensor:
    """The reference: each micro-batch embedded with a graph (the torch RNG seeded where
    `seeds` says), per-sample outputs concatenated, 0-dim ones the first's, the loss once."""
    embeddings = []
    for batch, seed in zip(micro, seeds, strict=True):
        if seed is not None:
            torch.manual_seed(seed)
        embeddings.append(method.embed(batch))
    joined = {
        k: v if v.ndim == 0 else torch.cat([e[k] for e in embeddings])
        for k, v in embeddings[0].items()
    }
    loss, _ = method.loss_from_embeddings(joined)
    loss.backward()
    return loss.detach()


def reference(case: str, batch: dict, micro: list[dict], seeds: list[int | None]):
    """(loss, gradients, buffers after) of the reference step for `case`."""
    method = build(case)
    if CASES[case][3]:
        loss, _ = method(batch)
        loss.backward()
        loss = loss.detach()
    else:
        loss = definition_step(method, micro, seeds)
    return loss, grads(method), buffers(method)


def assert_same_gradients(got: dict, want: dict, rel: float = 1e-5) -> None:
    """Same parameters, each within `rel` of the reference's largest entry. A gradient that is
    zero in exact arithmetic (a bias just before BatchNorm: its largest entry below 1e-4 of the
    model's largest gradient, roundoff) is measured against the model's largest gradient."""
    assert got.keys() == want.keys()
    largest = max(g.abs().max() for g in want.values())
    for name, g in want.items():
        scale = g.abs().max()
        if scale < 1e-4 * largest:
            scale = largest
        err = (got[name] - g).abs().max() / scale
        assert err <= rel, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_exact_accumulation_equals_the_full_batch_gradient(case):
    method = build(case)
    batch = full_batch(method)
    micro = split(batch, K)
    before = buffers(method)
    torch.manual_seed(7)
    parts = exact_step(micro_steps(method, method, micro))
    after_exact = torch.get_rng_state()
    loss, want, want_buffers = reference(case, batch, micro, [7, None, None, None])
    if not CASES[case][3]:  # the generator stands where pass 1 left it: K embeds, no replay
        assert torch.equal(after_exact, torch.get_rng_state())
    assert parts["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    assert_same_gradients(grads(method), want)
    got_buffers = buffers(method)
    for name, b in want_buffers.items():  # BatchNorm statistics: one update per micro-batch
        torch.testing.assert_close(got_buffers[name], b, rtol=1e-6, atol=1e-7, msg=name)
    tracked = [n for n in before if n.endswith("num_batches_tracked")]
    assert all(int(got_buffers[n] - before[n]) == K for n in tracked)


def test_batchnorm_cases_are_really_per_micro_batch():
    """The BN cases differ from one batch of 32 (so the definition is the right reference), and
    without BN the definition equals the genuine batch (so it is not a weaker check)."""
    for case, differs in (("msclip", True), ("msclip-ln", False)):
        batch = full_batch(build(case))
        micro = split(batch, K)
        one = build(case)
        one(batch)[0].backward()
        defined = build(case)
        definition_step(defined, micro, [None] * K)
        g1, g2 = grads(one), grads(defined)
        worst = max(((g1[n] - g2[n]).abs().max() / g2[n].abs().max()).item() for n in g2)
        assert (worst > 1e-3) == differs, (case, worst)


def test_pass_one_leaves_buffers_and_rng_as_one_train_mode_pass():
    """BatchNorm running statistics after an exact step equal those after one train-mode pass
    over the micro-batches (not two)."""
    method = build("aclip")
    micro = split(full_batch(method), K)
    one_pass = build("aclip")
    with torch.no_grad():
        for batch in micro:
            one_pass.embed(batch)
    exact_step(micro_steps(method, method, micro))
    want = buffers(one_pass)
    got = buffers(method)
    assert any("running_mean" in n for n in want)
    for name, b in want.items():
        torch.testing.assert_close(got[name], b, rtol=1e-6, atol=1e-7, msg=name)


def old_step(method: Method, micro: list[dict]) -> dict:
    """The accumulation step before exact accumulation existed (trainer.py at 6b90ad0)."""
    parts_sum: dict = {}
    for batch in micro:
        loss, parts = method(batch)
        (loss / len(micro)).backward()
        for k, v in {"loss": loss.detach(), **parts}.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v.float() / len(micro)
    return parts_sum


@pytest.mark.parametrize("case", ["clip", "flip", "aclip"])
def test_independent_mode_is_the_old_step(case):
    method, old = build(case), build(case)
    micro = split(full_batch(method), K)
    torch.manual_seed(3)
    got = independent_step(micro_steps(method, method, micro))
    torch.manual_seed(3)
    want = old_step(old, micro)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    g, w = grads(method), grads(old)
    assert g.keys() == w.keys() and all(torch.equal(g[n], w[n]) for n in w)


def test_forward_is_embed_then_loss():
    """`forward` is the composition (`embed`, then `objective`), bit for bit; `embed_only` returns
    the embeddings."""
    for case in ("clip", "flip", "aclip"):
        method = build(case)
        batch = split(full_batch(method), K)[0]
        torch.manual_seed(5)
        loss, parts = method(batch)
        torch.manual_seed(5)
        emb = method(batch, embed_only=True)
        loss2, parts2 = method.objective(emb)
        assert torch.equal(loss, loss2) and parts.keys() == parts2.keys()
        assert all(v.shape[0] == MICRO for v in emb.values() if v.ndim)


@methods.register("forward-only")
class ForwardOnly(Method):
    """A method that overrides `forward` alone (as docs/extending.md's toy does)."""

    name = "forward-only"

    def __init__(self, cfg: MethodConfig, model: torch.nn.Module):
        super().__init__(model)

    def forward(self, batch):
        raise AssertionError("never called here")


def test_methods_without_the_split_train_independent_only(tmp_path, demo_root):
    check_accum_mode(ForwardOnly, 4, "independent")
    check_accum_mode(ForwardOnly, 1, "exact")
    with pytest.raises(ConfigError, match="--accum-mode independent"):
        check_accum_mode(ForwardOnly, 2, "exact")
    for name in ("clip", "flip", "aclip", "aclip-eff", "attmask-high"):  # the built-in ones
        check_accum_mode(methods.method_class(name), 2, "exact")
    run = tmp_path / "run"
    line = user_error(
        "pretrain", "--data", demo_root / "train", "--out", run, "--model", "test",
        "--method", "forward-only", "--steps", 1, "--accum-steps", 2,
    )  # fmt: skip
    assert "--accum-mode independent" in line and not run.exists()


def test_runs_saved_before_accum_mode_resume_independent():
    assert with_legacy_defaults({"optim": {"lr": 1.0}})["optim"]["accum_mode"] == "independent"
    kept = {"optim": {"accum_mode": "exact"}}
    assert with_legacy_defaults(kept)["optim"]["accum_mode"] == "exact"


# -- 2 gloo ranks x 2 micro-batches of 8 ------------------------------------------------------

GLOO_CASES = list(CASES)


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for case in GLOO_CASES:
        method = build(case)
        mine = split(full_batch(method), world)[rank]
        engine = DDP(method, find_unused_parameters=method.has_unused_parameters)
        torch.manual_seed(100 + rank)
        parts = exact_step(micro_steps(engine, method, split(mine, 2), distributed=True))
        loss = parts["loss"].clone()
        dist.all_reduce(loss)
        results[case] = {"loss": loss / world, "grads": grads(method)}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gloo")
    mp.spawn(_gloo_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", GLOO_CASES)
def test_two_gloo_ranks_equal_one_process(gloo_results, case):
    method = build(case)
    batch = full_batch(method)
    micro = split(batch, K)  # rank 0's two micro-batches, then rank 1's: the gathered order
    loss, want, _ = reference(case, batch, micro, [100, None, 101, None])
    for rank in range(2):
        got = gloo_results[rank][case]
        assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
        assert_same_gradients(got["grads"], want)


# -- through the CLI ----------------------------------------------------------------------------


def _pretrain(demo_root, out, *extra):
    return invoke(
        "pretrain", "--data", demo_root / "train", "--out", out, "--model", "test",
        "--batch-size", 8, "--workers", 1, "--threads", 1, "--log-every", 1, "--warmup", 1,
        *extra,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["clip", "flip"])
def test_cli_trains_with_exact_accumulation(tmp_path, demo_root, method):
    run = tmp_path / "run"
    res = _pretrain(demo_root, run, "--method", method, "--accum-steps", 2, "--steps", 2)
    assert res.exit_code == 0, res.output
    state = checkpoint.load(run)
    assert state["step"] == 2 and state["samples_seen"] == 2 * 8 * 2
    assert state["config"]["optim"]["accum_mode"] == "exact"
    assert "accum_mode: exact" in (run / "config.yaml").read_text()
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--accum-steps", 0], "--accum-steps must be >= 1"),
        (["--accum-steps", 2, "--accum-mode", "sum"], "--accum-mode"),
    ],
)
def test_cli_refuses_bad_accumulation(tmp_path, demo_root, flags, needle):
    run = tmp_path / "run"
    line = user_error(
        "pretrain", "--data", demo_root / "train", "--out", run, "--model", "test",
        "--steps", 1, *flags,
    )  # fmt: skip
    assert needle in line
    assert not run.exists()
