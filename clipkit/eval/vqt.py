"""Visual Query Tuning probe (Tang et al., CVPR 2023, "Visual Query Tuning: Towards Effective
Usage of Intermediate Representations for Parameter and Memory Efficient Transfer Learning",
arXiv 2212.03220, Sec. 3).

A few learnable query tokens Q_m (Q, W) are appended to the input of every block m of a frozen
open_clip `VisionTransformer`. Inside the block the queries attend to the block's tokens and to
themselves, while the attention mask keeps every original token from attending to the queries, so
the backbone's own tokens, [CLS] and pooled feature are exactly what they are without queries.
The queries' outputs are not fed to the next block (a fresh Q_{m+1} is); they summarise each
layer's intermediate tokens. The classifier is one linear layer over

    [image feature of the frozen tower ; query outputs of all layers]      (E + M*Q*W)

and only the queries and that layer are trained (cross-entropy, AdamW). With 0 queries this is a
linear classifier on the final image features.

The masked joint attention over [tokens; queries] is computed as two attentions with the block's
own weights: tokens over tokens (what the mask leaves them), queries over [tokens; queries].
Each part is layer-normalised (no learned affine) before the head, so layers with different
activation scales weigh in evenly; this choice is clipkit's, the paper does not pin it down.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from clipkit.config import ConfigError
from clipkit.data.eval_sets import ClassificationSet, collate_labelled
from clipkit.eval.embed import SkipCounter, check_skipped
from clipkit.eval.metrics import classification_metrics
from clipkit.eval.results import probe_record
from clipkit.models.vit import embed_patches, require_vit

SHUFFLE_BUFFER = 4096  # samples held to shuffle a streamed training set


@dataclass(frozen=True)
class VQTSettings:
    """How the VQT probe trains (`clipkit probe --vqt-*`)."""

    queries: int  # query tokens per layer
    epochs: int
    lr: float  # AdamW
    weight_decay: float
    batch_size: int


def _check_block(block: nn.Module) -> ResidualAttentionBlock:
    attn = getattr(block, "attn", None)
    if not isinstance(block, ResidualAttentionBlock) or not isinstance(attn, nn.MultiheadAttention):
        raise TypeError(f"VQT supports open_clip's ResidualAttentionBlock, not {type(block)}")
    if not attn._qkv_same_embed_dim or not attn.batch_first or attn.bias_k is not None:
        raise TypeError("VQT expects open_clip's packed, batch-first attention without bias_k")
    return block


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, W) -> (B, H, T, W/H)."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def _qkv(attn: nn.MultiheadAttention, h: torch.Tensor) -> list[torch.Tensor]:
    """(B, T, W) layer-normed input -> q, k, v each (B, H, T, W/H), with the block's weights."""
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # (B, T, 3W)
    return [_heads(part, attn.num_heads) for part in qkv.chunk(3, dim=-1)]


def _attend(attn: nn.MultiheadAttention, q, k, v) -> torch.Tensor:
    """Heads (B, H, T, d) -> (B, T, W) after the block's output projection."""
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, d)
    out = out.transpose(1, 2).flatten(2)  # (B, T, W)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


def _finish(block: ResidualAttentionBlock, x: torch.Tensor, attended: torch.Tensor):
    """Residual + layer scale, then the MLP half of the block."""
    x = x + block.ls_1(attended)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def block_with_queries(
    block: nn.Module, tokens: torch.Tensor, queries: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm block on [tokens; queries] with tokens unable to see the queries.

    Args:
        block: an open_clip `ResidualAttentionBlock` (frozen).
        tokens: (B, T, W) the block's normal input.
        queries: (B, Q, W) this layer's query tokens.

    Returns:
        (B, T, W) the block's normal output (no gradient: the backbone is frozen) and
        (B, Q, W) the queries' outputs.
    """
    block = _check_block(block)
    attn = block.attn
    with torch.no_grad():  # the token path never depends on the queries
        q_tok, k_tok, v_tok = _qkv(attn, block.ln_1(tokens))
        tokens_out = _finish(block, tokens, _attend(attn, q_tok, k_tok, v_tok))
    if queries.shape[1] == 0:
        return tokens_out, queries
    q_q, k_q, v_q = _qkv(attn, block.ln_1(queries))
    k_all, v_all = torch.cat([k_tok, k_q], dim=2), torch.cat([v_tok, v_q], dim=2)  # (B,H,T+Q,d)
    return tokens_out, _finish(block, queries, _attend(attn, q_q, k_all, v_all))


def forward_with_queries(
    visual: VisionTransformer, images: torch.Tensor, queries: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The frozen tower on `images` with VQT queries.

    Args:
        visual: open_clip `VisionTransformer` (eval mode; its patch dropout is not applied).
        images: (B, 3, H, W).
        queries: (M, Q, W) one set per block, or None / Q = 0 for the plain tower.

    Returns:
        image features (B, E) exactly as `visual(images)` (projected, not normalised),
        query outputs (B, M, Q, W), and every block's token output [(B, T, W)] * M.
    """
    visual = require_vit(visual)
    blocks = visual.transformer.resblocks
    with torch.no_grad():
        x = embed_patches(visual, images)  # (B, T, W)
    batch, width = x.shape[0], x.shape[-1]
    if queries is None:
        queries = x.new_zeros(len(blocks), 0, width)
    if queries.shape[0] != len(blocks) or queries.shape[-1] != width:
        raise ValueError(f"queries {tuple(queries.shape)} do not fit {len(blocks)} x W={width}")
    layer_tokens, query_outputs = [], []
    for block, q in zip(blocks, queries, strict=True):
        x, q_out = block_with_queries(block, x, q.unsqueeze(0).expand(batch, -1, -1))
        layer_tokens.append(x)
        query_outputs.append(q_out)
    with torch.no_grad():
        pooled, _ = visual._pool(x)  # open_clip's ln_post + [CLS] / avg pooling
        features = pooled @ visual.proj if visual.proj is not None else pooled
    return features, torch.stack(query_outputs, dim=1), layer_tokens


class VQTProbe(nn.Module):
    """Learnable queries (M, Q, W) and the linear head; the frozen tower is passed to `forward`,
    so `parameters()` are exactly what trains."""

    def __init__(self, layers: int, width: int, embed_dim: int, num_queries: int, num_classes: int):
        super().__init__()
        if num_queries < 0:
            raise ValueError(f"num_queries must be >= 0, got {num_queries}")
        # Small random init, as VPT-style prompts; ln_1 rescales them inside every block.
        self.queries = nn.Parameter(torch.randn(layers, num_queries, width) * 0.02)
        self.head = nn.Linear(embed_dim + layers * num_queries * width, num_classes)

    @classmethod
    def for_tower(cls, visual: VisionTransformer, num_queries: int, num_classes: int) -> VQTProbe:
        visual = require_vit(visual)
        layers, width = len(visual.transformer.resblocks), visual.transformer.width
        embed_dim = visual.output_dim
        return cls(layers, width, embed_dim, num_queries, num_classes)

    def features(self, visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E + M*Q*W): the head's input, every part layer-normalised."""
        image_features, query_outputs, _ = forward_with_queries(visual, images, self.queries)
        parts = [F.layer_norm(image_features.float(), image_features.shape[-1:])]
        if query_outputs.shape[2] > 0:
            q = F.layer_norm(query_outputs.float(), query_outputs.shape[-1:])  # (B, M, Q, W)
            parts.append(q.flatten(1))
        return torch.cat(parts, dim=1)

    def forward(self, visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, C)."""
        return self.head(self.features(visual, images))


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients for every parameter of the backbone."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class _ShuffleBuffer(torch.utils.data.IterableDataset):
    """Streamed (tar) sets have no index to permute: shuffle through a buffer of `size` samples,
    in an order fixed by `seed` (a new loader with a new seed every epoch)."""

    def __init__(self, dataset, size: int, seed: int):
        self.dataset, self.size, self.seed = dataset, size, seed

    def __iter__(self):
        rng = random.Random(self.seed)
        buffer = []
        for sample in self.dataset:
            buffer.append(sample)
            if len(buffer) >= self.size:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer


def _loader(data: ClassificationSet, batch_size: int, workers: int, shuffle: bool, seed: int):
    """Map-style sets are permuted, streamed ones shuffled through a buffer (order from `seed`)."""
    dataset, iterable = data.dataset, isinstance(data.dataset, torch.utils.data.IterableDataset)
    if shuffle and iterable:
        dataset = _ShuffleBuffer(dataset, SHUFFLE_BUFFER, seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and not iterable,
        num_workers=workers,
        collate_fn=collate_labelled,
        generator=torch.Generator().manual_seed(seed),
    )


def _batches(loader, device, skipped: SkipCounter | None):
    for batch in loader:
        if skipped is not None:
            skipped.add(batch["bad"])
        if batch["image"] is not None:
            yield batch["image"].to(device), batch["label"].to(device)


def train_vqt(
    probe: VQTProbe,
    visual: VisionTransformer,
    train: ClassificationSet,
    *,
    device: torch.device,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    workers: int,
    seed: int,
    max_bad_fraction: float,
) -> dict[str, Any]:
    """AdamW on cross-entropy over `epochs` passes: `train_loss` (mean per epoch), `num_train`.

    The learning rate follows a cosine over epochs (not steps: a streamed set's length is only
    known after the first pass)."""
    probe.train()
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    losses, num_train = [], 0
    for epoch in range(epochs):
        loader = _loader(train, batch_size, workers, shuffle=True, seed=seed * 1_000 + epoch)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        skipped = SkipCounter() if epoch == 0 else None
        total, seen = 0.0, 0
        for images, labels in _batches(loader, device, skipped):
            loss = F.cross_entropy(probe(visual, images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(labels), seen + len(labels)
        if skipped is not None:
            check_skipped(skipped, seen, max_bad_fraction)
            num_train = seen
        losses.append(total / max(seen, 1))
    return {"train_loss": losses, "num_train": num_train}


@torch.no_grad()
def predict(probe: VQTProbe, visual, data: ClassificationSet, *, device, batch_size, workers):
    """(N, C) logits and (N,) labels of a split, on the CPU."""
    probe.eval()
    loader = _loader(data, batch_size, workers, shuffle=False, seed=0)
    logits, labels = [], []
    for images, y in _batches(loader, device, None):
        logits.append(probe(visual, images).float().cpu())
        labels.append(y.cpu())
    if not logits:
        raise ConfigError(f"{data.root}: no readable images in split '{data.split}'")
    return torch.cat(logits), torch.cat(labels)


def _check_probe_args(loaded, num_queries: int, epochs: int) -> None:
    if not isinstance(loaded.model.visual, VisionTransformer):
        raise ConfigError(
            f"--method vqt needs a ViT image tower, got {type(loaded.model.visual).__name__}"
        )
    if num_queries < 0 or epochs < 1:
        raise ConfigError("--vqt-queries must be >= 0 and --vqt-epochs >= 1")


def run_vqt_probe(
    loaded,
    train: ClassificationSet,
    test: ClassificationSet,
    *,
    device: torch.device,
    settings: VQTSettings,
    workers: int = 2,
    seed: int = 0,
    max_bad_fraction: float = 0.01,
) -> dict[str, Any]:
    """Train a VQT probe on `train`, score `test`: `lp_acc1`, `lp_acc5`,
    `lp_mean_per_class_recall` (CLIP_benchmark's linear-probe names) in a results record."""
    _check_probe_args(loaded, settings.queries, settings.epochs)
    visual = freeze(loaded.model).visual
    torch.manual_seed(seed)
    probe = VQTProbe.for_tower(visual, settings.queries, len(train.classnames)).to(device)
    opts = dict(device=device, batch_size=settings.batch_size, workers=workers)
    hyper = dict(epochs=settings.epochs, lr=settings.lr, weight_decay=settings.weight_decay)
    fit = train_vqt(
        probe, visual, train, **opts, **hyper, seed=seed, max_bad_fraction=max_bad_fraction
    )
    logits, labels = predict(probe, visual, test, **opts)
    metrics = classification_metrics(logits, labels)
    record = {
        "num_queries": settings.queries,
        **hyper,
        "batch_size": settings.batch_size,
        "trainable_parameters": sum(p.numel() for p in probe.parameters()),
    }
    return probe_record(
        loaded,
        train,
        test,
        metrics={f"lp_{name}": value for name, value in metrics.items()},
        counts=(fit["num_train"], len(labels)),
        seed=seed,
        method="vqt",
        vqt={**record, "train_loss": fit["train_loss"]},
    )
