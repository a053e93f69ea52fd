"""The frozen distillation teacher (`--distill-from`): loaded from a run, a checkpoint file or an
open_clip export folder; its inputs adapted from the student's batch; bad teachers refused."""

import pytest
import torch

from clipkit import checkpoint
from clipkit.config import ConfigError
from clipkit.data.preprocess import Preprocess
from clipkit.export import export_open_clip
from clipkit.methods.teacher import (
    EOT_TOKEN,
    adapt_images,
    adapt_tokens,
    check_compatible,
    load_teacher,
)

CPU = torch.device("cpu")


def test_teacher_from_run_file_and_export_agree(tiny_checkpoint, tmp_path):
    latest = tiny_checkpoint / "checkpoints" / "latest.pt"
    from_run, from_file = load_teacher(str(tiny_checkpoint), CPU), load_teacher(str(latest), CPU)
    assert from_run.sha256 == from_file.sha256 == checkpoint.sha256(latest)
    assert from_run.embed_dim == 32 and from_run.preprocess.image_size == 32
    assert not any(p.requires_grad for p in from_run.model.parameters())
    assert not from_run.model.training
    export_open_clip(tiny_checkpoint, tmp_path / "oc")
    exported = load_teacher(f"local-dir:{tmp_path / 'oc'}", CPU)
    assert exported.sha256 == checkpoint.sha256(tmp_path / "oc" / "open_clip_model.safetensors")
    image, text = torch.randn(4, 3, 32, 32), torch.randint(1, 400, (4, 16))
    a = from_run.embed(image, text, from_run.preprocess)
    b = exported.embed(image, text, from_run.preprocess)
    for key in ("teacher_image", "teacher_text", "teacher_scale"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert from_run.record() == {
        "source": str(latest.resolve()),
        "sha256": from_run.sha256,
        "embed_dim": 32,
    }


def test_bad_teachers_are_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint or run directory"):
        load_teacher(str(tmp_path / "missing"), CPU)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no open_clip_config.json"):
        load_teacher(f"local-dir:{tmp_path / 'empty'}", CPU)
    teacher = load_teacher(str(tiny_checkpoint), CPU)
    with pytest.raises(ConfigError, match="embeds in 32 dimensions, the student in 128"):
        check_compatible(teacher, teacher.preprocess, 128)
    hf = Preprocess(32, teacher.preprocess.mean, teacher.preprocess.std, hf_tokenizer_name="x")
    with pytest.raises(ConfigError, match="same tokenizer"):
        check_compatible(teacher, hf, 32)


def test_images_are_renormalised_and_resized_for_the_teacher():
    student = Preprocess(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    teacher = Preprocess(image_size=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    pixels = torch.full((2, 3, 8, 8), 0.75)
    image = (pixels - 0.5) / 0.25  # what the student's transform made of a flat 0.75 image
    out = adapt_images(image, student, teacher)
    assert out.shape == (2, 3, 4, 4)
    torch.testing.assert_close(out, torch.full((2, 3, 4, 4), 0.75))
    assert adapt_images(image, student, student) is image  # nothing to adapt


def test_tokens_are_padded_or_cut_keeping_the_end_token():
    class Stub:
        def __init__(self, length):
            self.preprocess = Preprocess(32, (0,), (1,), context_length=length)

    text = torch.tensor(
        [[EOT_TOKEN - 1, 5, 6, EOT_TOKEN, 0, 0], [EOT_TOKEN - 1, 5, EOT_TOKEN, 0, 0, 0]]
    )
    assert adapt_tokens(text, Stub(6)) is text
    assert adapt_tokens(text, Stub(8)).tolist()[0] == [*text[0].tolist(), 0, 0]
    cut = adapt_tokens(text, Stub(3)).tolist()
    assert cut[0] == [EOT_TOKEN - 1, 5, EOT_TOKEN]  # end token was cut off: put back last
    assert cut[1] == [EOT_TOKEN - 1, 5, EOT_TOKEN]  # already inside
