"""`--val-data SHARDS`: the run's contrastive loss (`--loss`: clip or siglip) on held-out pairs,
logged as `val/loss`.

The model is in eval mode, without a graph, on full images (the evaluation transform: no
augmentation, no token removal); each image is paired with its first caption. The loss is
computed over batches of the training batch size taken from the whole held-out set in its fixed
order (shard by shard, sample by sample; no shuffle, no resampling), each batch its own
contrastive problem as a single process would see it, and averaged weighted by the batch sizes.

Under DDP every rank embeds its share of the samples (the expensive part), the features are
gathered in that fixed order, and the batches are cut from the whole: so the number does not
depend on the number of ranks (nor of data workers), and every evaluation sees the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from clipkit.data.eval_pairs import PairedSet, paired_set
from clipkit.distributed import DistInfo
from clipkit.eval import LoaderSettings
from clipkit.eval.embed import EmbeddedPart, check_skipped, merge_parts
from clipkit.eval.retrieval import embed_pair_part
from clipkit.eval.sharded import gather
from clipkit.losses import clip_loss, siglip_loss


def open_val_data(path: str, transform=None) -> PairedSet:
    """The held-out pairs (a .tar, a directory of *.tar, or a captioned image folder) read with
    the evaluation `transform`; a missing path or a wrong layout is a ConfigError (checked
    before the run starts)."""
    return paired_set(path, transform)


class ValidationError(RuntimeError):
    """The held-out loss could not be computed (the run logs it and goes on)."""


@dataclass
class ValFeatures:
    """The held-out set embedded: one image and its first caption per row, in the set's order."""

    image_features: torch.Tensor  # (N, D), unit norm
    text_features: torch.Tensor  # (N, D), unit norm


def mean_batch_loss(
    features: ValFeatures, batch_size: int, loss_kind: str, scales: dict
) -> torch.Tensor:
    """The mean contrastive loss over consecutive batches of `batch_size` rows, each batch its
    own problem (the last may be smaller), weighted by the batch sizes."""
    total, n = torch.zeros(()), len(features.image_features)
    for start in range(0, n, batch_size):
        image = features.image_features[start : start + batch_size]  # (B, D)
        text = features.text_features[start : start + batch_size]
        if loss_kind == "siglip":
            loss = siglip_loss(
                image, text, scales["logit_scale"], scales["logit_bias"], gather=False
            )
        else:
            loss = clip_loss(image, text, scales["logit_scale"], gather=False)
        total += loss * len(image)
    return total / n


class Validation:
    """Computes `val/loss` of a method's online model (every rank calls `loss`)."""

    def __init__(
        self,
        path: str,
        batch_size: int,
        reading: LoaderSettings,
        transform,
        tokenizer,
        device: torch.device,
        dist: DistInfo,
    ):
        self.data = open_val_data(path, transform)
        self.batch_size, self.reading, self.tokenizer = batch_size, reading, tokenizer
        self.device, self.dist = device, dist

    @torch.no_grad()
    def loss(self, model: nn.Module, loss_kind: str, scales: dict) -> float:
        """The held-out loss; `scales`: the model's exp'd logit scale (and bias)."""
        try:
            mine = self._embed_share(model)
        except Exception as e:  # a damaged shard...: every rank must still reach the gather
            mine = f"{type(e).__name__}: {e}"
        features = self._gathered(mine)
        scales = {k: v.detach().float().cpu() for k, v in scales.items()}
        return float(mean_batch_loss(features, self.batch_size, loss_kind, scales))

    def _embed_share(self, model: nn.Module) -> EmbeddedPart:
        """This rank's share of the set: images and captions, tagged with their places."""
        encoder = SimpleNamespace(model=model, tokenizer=self.tokenizer)
        return embed_pair_part(
            encoder, self.data.dataset, self.device, self.reading, total=self.data.num_samples,
            rank=self.dist.rank, world=self.dist.world_size, show=self.dist.is_main,
        )  # fmt: skip

    def _gathered(self, mine: EmbeddedPart | str) -> ValFeatures:
        """Every rank's rows in the set's order, each image with its first caption (images
        without one left out); a rank's failure (its message) is raised on every rank."""
        parts = gather(mine, self.dist)
        failed = [p for p in parts if isinstance(p, str)]
        if failed:
            raise ValidationError(failed[0])
        whole = merge_parts(parts)
        check_skipped(whole.skipped, len(whole), self.reading.max_bad_fraction, self.data.root)
        counts = torch.tensor([len(c) for c in whole.rows["captions"]], dtype=torch.long)
        first = counts.cumsum(0) - counts  # each row's first caption among the text rows
        has = counts > 0
        if not bool(has.any()):
            raise ValidationError(f"{self.data.root}: no captioned images to compute the loss on")
        return ValFeatures(whole.image_features[has], whole.text_features[first[has]])
