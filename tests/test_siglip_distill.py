"""`--loss siglip` and `--distill-from` through the library and the CLI: what the run trains,
saves, exports and resumes; the teacher frozen, run once per micro-batch and never saved; bad
teachers and losses refused in one line with nothing written."""

import json

import pytest
import torch
from cli_util import run, user_error
from test_exact_accum import K, assert_same_gradients, full_batch, grads, micro_steps, split

from clipkit import checkpoint, methods
from clipkit.config import MethodConfig, ModelConfig
from clipkit.methods.teacher import load_teacher
from clipkit.models import factory
from clipkit.train.accumulate import exact_step, independent_step

CPU = torch.device("cpu")
TRAIN = ["--model", "test", "--batch-size", 8, "--workers", 1, "--threads", 1, "--log-every", 1,
         "--warmup", 1, "--schedule", "constant", "--device", "cpu"]  # fmt: skip


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def pretrain(demo_root, out, *extra):
    return run("pretrain", "--data", demo_root / "train", "--out", out, *TRAIN, *extra)


# -- SigLIP --------------------------------------------------------------------------------------


def test_siglip_run_trains_the_bias_and_exports_it_to_open_clip(demo_root, tmp_path):
    import open_clip

    out = tmp_path / "run"
    code, _, stderr = pretrain(demo_root, out, "--loss", "siglip", "--steps", 3)
    assert code == 0, stderr
    rows = metrics(out)
    assert all("siglip_loss" in r and "logit_bias" in r for r in rows)
    assert rows[0]["logit_bias"] != rows[-1]["logit_bias"]  # learnable, it moved
    state = checkpoint.load(out)
    assert state["config"]["model"]["init_logit_bias"] == -10.0
    assert state["model"]["logit_bias"].numel() == 1
    code, _, stderr = run("export", "--checkpoint", out, "--out", tmp_path / "oc")
    assert code == 0, stderr
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    assert model.logit_bias.item() == pytest.approx(state["model"]["logit_bias"].item())
    results = tmp_path / "zs.json"
    code, _, stderr = run("zero-shot", "demo", "--data-root", demo_root, "--checkpoint", out,
                          "--workers", 0, "-o", results)  # fmt: skip
    assert code == 0, stderr


def _run_twice(demo_root, tmp_path, *extra):
    """A 4-step run, and the same run stopped after 2 steps and resumed: (straight, resumed)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert pretrain(demo_root, straight, *extra, "--steps", 4)[0] == 0
    assert pretrain(demo_root, resumed, *extra, "--steps", 2, "--save-every", 2)[0] == 0
    code, _, stderr = pretrain(demo_root, resumed, *extra, "--steps", 4, "--resume")
    assert code == 0, stderr
    return straight, resumed


def _assert_bit_identical(straight, resumed):
    a, b = metrics(straight), metrics(resumed)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    sa, sb = checkpoint.load(straight)["model"], checkpoint.load(resumed)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_siglip_with_exact_accumulation_resumes_bit_identically(demo_root, tmp_path):
    _assert_bit_identical(*_run_twice(demo_root, tmp_path, "--loss", "siglip", "--accum-steps", 2))


# -- distillation --------------------------------------------------------------------------------


def _student_with_teacher(tiny_checkpoint, name="clip", preset="test"):
    teacher = load_teacher(str(tiny_checkpoint), CPU)
    torch.manual_seed(0)
    model = factory.build(ModelConfig(name=preset))
    method = methods.build(MethodConfig(name=name), model)
    pp = factory.preprocess(factory.resolve_arch(ModelConfig(name=preset)))
    method.set_objectives("clip", teacher, distill_weight=0.5, preprocess=pp)
    return method, teacher


def test_distilled_exact_step_equals_the_full_batch_and_runs_the_teacher_once(tiny_checkpoint):
    method, teacher = _student_with_teacher(tiny_checkpoint)
    frozen = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    calls = []
    teacher.model.register_forward_hook(lambda *_: calls.append(1))
    batch = full_batch(method)
    parts = exact_step(micro_steps(method, method, split(batch, K)))
    assert len(calls) == K  # pass 1 only: pass 2 needs no targets
    assert "distill_loss" in parts and parts["distill_loss"] > 0
    reference, _ = _student_with_teacher(tiny_checkpoint)
    loss, ref_parts = reference(batch)  # one batch of 32: CLIP is one computation over it
    loss.backward()
    assert parts["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    assert parts["distill_loss"].item() == pytest.approx(ref_parts["distill_loss"].item(), rel=1e-6)
    assert_same_gradients(grads(method), grads(reference))
    assert all(p.grad is None for p in teacher.model.parameters())
    independent_step(micro_steps(method, method, split(batch, K)))
    now = teacher.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen.items())  # the teacher never learns


def test_distillation_run_records_the_teacher_not_its_weights(demo_root, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    code, _, stderr = pretrain(
        demo_root, out, "--distill-from", tiny_checkpoint, "--distill-weight", 0.5, "--steps", 2
    )
    assert code == 0, stderr
    state = checkpoint.load(out)
    teacher_file = tiny_checkpoint / "checkpoints" / "latest.pt"
    assert state["teacher"]["sha256"] == checkpoint.sha256(teacher_file)
    assert set(state["model"]) == set(factory.build(ModelConfig(name="test")).state_dict())
    assert not any(k.startswith("teacher") for k in state["method_state"])
    assert all("distill_loss" in r for r in metrics(out))


def test_distillation_with_accumulation_resumes_bit_identically(
    demo_root, tiny_checkpoint, tmp_path
):
    extra = ["--distill-from", tiny_checkpoint, "--accum-steps", 2, "--method", "flip"]
    _assert_bit_identical(*_run_twice(demo_root, tmp_path, *extra))


def test_bad_teachers_and_losses_are_one_line_and_write_nothing(
    demo_root, tiny_checkpoint, tmp_path
):
    out = tmp_path / "run"
    base = ["pretrain", "--data", demo_root / "train", "--out", out, *TRAIN, "--steps", 1]
    cases = [
        (["--distill-from", tmp_path / "nope"], "no such checkpoint or run directory"),
        (["--distill-from", tiny_checkpoint, "--model", "tiny"],
         "the teacher embeds in 32 dimensions, the student in 128"),
        (["--distill-from", tiny_checkpoint, "--method", "aclip"], "several image views"),
        (["--distill-from", tiny_checkpoint, "--distill-weight", 0], "must be > 0"),
        (["--loss", "hinge"], "'hinge' is not one of 'clip', 'siglip'"),
    ]  # fmt: skip
    for extra, needle in cases:
        line = user_error(*base, *extra)
        assert needle in line, (extra, line)
        assert not out.exists(), extra
