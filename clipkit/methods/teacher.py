"""A frozen teacher for distillation (`--distill-from`): a clipkit checkpoint or run directory, or
an open_clip export folder (`local-dir:DIR`).

The student's similarity distributions learn the teacher's (the KL form of open_clip's
`DistillClipLoss`; clipkit.losses.distill_loss). The teacher runs without a graph on the student's
own batch, so its inputs are adapted, not re-read:
- images: the student's normalisation is undone, the image resized (bicubic, antialiased) to the
  teacher's size when it differs, and the teacher's normalisation applied. Both models see the
  same crop; a teacher trained on another crop rule sees this one.
- text: both models must use the same tokenizer (CLIP's BPE unless a Hugging Face one is named);
  the token ids are padded or cut to the teacher's context length, a cut text ending in the end
  token as open_clip's tokenizer ends it.
The teacher is not part of the method's state: checkpoints record its path and sha256 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipkit import checkpoint
from clipkit.config import ConfigError, ModelConfig
from clipkit.data.preprocess import Preprocess
from clipkit.methods.restore import load_method
from clipkit.models import factory
from clipkit.models.family import parse_model_name

EOT_TOKEN = 49407  # CLIP BPE's <end_of_text>: the highest id, which open_clip pools at


@dataclass
class Teacher:
    model: nn.Module  # eval mode, no gradients
    source: str  # what --distill-from named, resolved
    sha256: str | None  # of the checkpoint or weights file
    preprocess: Preprocess
    embed_dim: int

    def record(self) -> dict:
        """What a checkpoint keeps of the teacher (not its weights)."""
        return {"source": self.source, "sha256": self.sha256, "embed_dim": self.embed_dim}

    @torch.no_grad()
    def embed(
        self, image: torch.Tensor, text: torch.Tensor, student: Preprocess
    ) -> dict[str, torch.Tensor]:
        """The teacher's normalised image / text features and exp'd logit scale for a batch
        prepared for the student."""
        out = self.model(adapt_images(image, student, self.preprocess), adapt_tokens(text, self))
        return {
            "teacher_image": out["image_features"].float(),
            "teacher_text": out["text_features"].float(),
            "teacher_scale": out["logit_scale"].float(),
        }


def adapt_images(image: torch.Tensor, student: Preprocess, teacher: Preprocess) -> torch.Tensor:
    """(B, 3, S, S) normalised for the student -> normalised for the teacher, at its size."""
    same_norm = student.mean == teacher.mean and student.std == teacher.std
    if same_norm and image.shape[-1] == teacher.image_size:
        return image
    mean_s, std_s = _stats(student, image)
    pixels = image * std_s + mean_s
    if image.shape[-1] != teacher.image_size:
        size = (teacher.image_size, teacher.image_size)
        pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True)
        pixels = pixels.clamp(0, 1)
    mean_t, std_t = _stats(teacher, image)
    return (pixels - mean_t) / std_t


def _stats(pp: Preprocess, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def column(values) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)

    return column(pp.mean), column(pp.std)


def adapt_tokens(text: torch.Tensor, teacher: Teacher) -> torch.Tensor:
    """(B, L) token ids -> (B, L_teacher): zero-padded, or cut with the end token kept last."""
    length = teacher.preprocess.context_length
    if text.shape[1] == length:
        return text
    if text.shape[1] < length:
        return F.pad(text, (0, length - text.shape[1]))
    cut = text[:, :length].clone()
    lost_end = (text[:, length:] == EOT_TOKEN).any(dim=1)
    cut[lost_end, -1] = EOT_TOKEN
    return cut


def load_teacher(spec: str, device: torch.device) -> Teacher:
    """The frozen teacher `spec` names, on `device`; ConfigError (one line) if it cannot be."""
    folder = parse_model_name(spec).folder
    if folder is not None:
        if not (folder / "open_clip_config.json").is_file():
            raise ConfigError(f"--distill-from {spec}: no open_clip_config.json in {folder}")
        weights = factory.default_weights(spec)
        if weights is None:
            raise ConfigError(f"--distill-from {spec}: the folder holds no weights file")
        cfg = ModelConfig(name=spec)
        model, arch = factory.build(cfg), cfg.arch
        source, sha = f"local-dir:{folder.resolve()}", checkpoint.sha256(weights)
    else:
        if not Path(spec).exists():
            raise ConfigError(f"--distill-from {spec}: no such checkpoint or run directory")
        loaded = load_method(spec)
        model, arch = loaded.model(), loaded.config.model.arch
        source, sha = str(loaded.path.resolve()), loaded.sha256
    model = model.to(device).eval().requires_grad_(False)
    preprocess = factory.preprocess(arch)
    probe = torch.zeros(1, preprocess.context_length, dtype=torch.long, device=device)
    with torch.no_grad():
        embed_dim = int(model.encode_text(probe).shape[-1])
    return Teacher(model, source, sha, preprocess, embed_dim)


def check_compatible(teacher: Teacher, student: Preprocess, student_embed_dim: int) -> None:
    """Refuse a teacher the student cannot be distilled from, before training starts."""
    if teacher.embed_dim != student_embed_dim:
        raise ConfigError(
            f"--distill-from {teacher.source}: the teacher embeds in {teacher.embed_dim} "
            f"dimensions, the student in {student_embed_dim}; distil between models of the "
            "same embedding width"
        )
    if teacher.preprocess.hf_tokenizer_name != student.hf_tokenizer_name:
        raise ConfigError(
            f"--distill-from {teacher.source}: the teacher tokenizes with "
            f"{teacher.preprocess.hf_tokenizer_name or 'CLIP BPE'}, the student with "
            f"{student.hf_tokenizer_name or 'CLIP BPE'}; both must use the same tokenizer"
        )


def teacher_for(spec: str | None, student_arch: dict, device: torch.device) -> Teacher | None:
    """The teacher `--distill-from` names, checked against the student's architecture (None
    without one). Called before the run directory is touched: a bad teacher writes nothing."""
    if not spec:
        return None
    teacher = load_teacher(spec, device)
    check_compatible(teacher, factory.preprocess(student_arch), factory.embed_dim(student_arch))
    return teacher
