"""Visual Query Tuning probe (arXiv 2212.03220): the frozen tower is untouched by the queries, the
queries see exactly what the paper's masked attention gives them, only queries + head train, and
`clipkit probe --method vqt` writes a CLIP_benchmark-style record."""

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from open_clip.transformer import VisionTransformer

from clipkit.cli.main import cli
from clipkit.eval.vqt import VQTProbe, block_with_queries, forward_with_queries, freeze
from clipkit.models.vit import embed_patches

WIDTH, LAYERS, HEADS, EMBED = 32, 2, 4, 16


def tower(ls_init_value=None) -> VisionTransformer:
    visual = VisionTransformer(
        image_size=32,
        patch_size=8,
        width=WIDTH,
        layers=LAYERS,
        heads=HEADS,
        mlp_ratio=2.0,
        ls_init_value=ls_init_value,
        output_dim=EMBED,
    )
    return freeze(visual)


@pytest.mark.parametrize("ls_init_value", [None, 0.5])
def test_backbone_tokens_and_features_unchanged_by_queries(ls_init_value):
    visual = tower(ls_init_value)
    images = torch.randn(3, 3, 32, 32)
    queries = torch.randn(LAYERS, 4, WIDTH)
    features, query_outputs, layer_tokens = forward_with_queries(visual, images, queries)
    with torch.no_grad():
        x = embed_patches(visual, images)
        for block, tokens in zip(visual.transformer.resblocks, layer_tokens, strict=True):
            x = block(x)  # open_clip's own block, no queries
            torch.testing.assert_close(tokens, x, atol=1e-6, rtol=0)
        reference = visual(images)
    torch.testing.assert_close(features, reference, atol=1e-6, rtol=0)
    assert query_outputs.shape == (3, LAYERS, 4, WIDTH)
    # The queries really change nothing: a different set gives the same backbone outputs.
    features_2, outputs_2, _ = forward_with_queries(visual, images, 5 * queries)
    torch.testing.assert_close(features_2, features, atol=0, rtol=0)
    assert (outputs_2 - query_outputs).abs().max() > 1e-2


def test_queries_match_masked_joint_attention():
    """The paper's formulation: one block on [tokens; queries], tokens masked from the queries."""
    visual = tower(0.5)
    block = visual.transformer.resblocks[0]
    tokens, queries = torch.randn(2, 17, WIDTH), torch.randn(2, 3, WIDTH)
    mask = torch.zeros(20, 20)
    mask[:17, 17:] = float("-inf")  # rows = attending tokens, columns = attended ones
    with torch.no_grad():
        joint = block(torch.cat([tokens, queries], dim=1), attn_mask=mask)
    tokens_out, queries_out = block_with_queries(block, tokens, queries)
    torch.testing.assert_close(tokens_out, joint[:, :17], atol=1e-6, rtol=0)
    torch.testing.assert_close(queries_out, joint[:, 17:], atol=1e-5, rtol=1e-5)
    # Without the mask the tokens would change: the mask is what keeps the backbone intact.
    with torch.no_grad():
        unmasked = block(torch.cat([tokens, queries], dim=1))
    assert (unmasked[:, :17] - tokens_out).abs().max() > 1e-3


def test_only_queries_and_head_get_gradients():
    visual = tower(0.5)
    probe = VQTProbe.for_tower(visual, num_queries=3, num_classes=5)
    assert probe.queries.shape == (LAYERS, 3, WIDTH)
    assert probe.head.in_features == EMBED + LAYERS * 3 * WIDTH
    logits = probe(visual, torch.randn(4, 3, 32, 32))
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is None for p in visual.parameters())
    assert not any(p.requires_grad for p in visual.parameters())
    for layer in range(LAYERS):  # every layer's queries reach the loss
        assert probe.queries.grad[layer].abs().sum() > 0
    assert probe.head.weight.grad.abs().sum() > 0 and probe.head.bias.grad.abs().sum() > 0
    names = {name for name, _ in probe.named_parameters()}
    assert names == {"queries", "head.weight", "head.bias"}


def test_zero_queries_is_a_linear_head_on_the_image_features():
    visual = tower()
    probe = VQTProbe.for_tower(visual, num_queries=0, num_classes=3)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        image_features = visual(images)
        expected = F.layer_norm(image_features, (EMBED,))
        torch.testing.assert_close(probe.features(visual, images), expected, atol=1e-6, rtol=0)
        logits = probe(visual, images)
    torch.testing.assert_close(logits, expected @ probe.head.weight.T + probe.head.bias)


def test_cli_vqt_probe_writes_results(demo_root, tiny_checkpoint, tmp_path):
    out = tmp_path / "vqt.json"
    args = ["probe", "demo", "--data-root", demo_root, "--checkpoint", tiny_checkpoint]
    args += ["--method", "vqt", "--vqt-epochs", "2", "--vqt-queries", "2", "--workers", "0"]
    result = CliRunner().invoke(cli, [str(a) for a in args + ["-o", out]])
    assert result.exit_code == 0, result.output
    assert "VQT probe" in result.stdout
    record = json.loads(out.read_text())
    assert record["task"] == "linear_probe"
    assert set(record["metrics"]) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"}
    assert 0 <= record["metrics"]["lp_acc1"] <= 1
    block = record["clipkit"]
    assert block["probe_method"] == "vqt" and block["num_samples"] == 64
    vqt = block["vqt"]
    assert vqt["num_queries"] == 2 and len(vqt["train_loss"]) == 2
    width, layers, embed = 32, 2, 32  # the `test` preset
    classes = block["num_classes"]
    assert vqt["trainable_parameters"] == layers * 2 * width + (embed + layers * 2 * width + 1) * (
        classes
    )
    bad = CliRunner().invoke(cli, [str(a) for a in args + ["--shots", "2"]])
    assert bad.exit_code == 2 and "not supported" in bad.stderr


class Streamed(torch.utils.data.IterableDataset):
    def __init__(self, samples):
        self.samples = samples

    def __iter__(self):
        return iter(self.samples)


@pytest.mark.parametrize("streamed", [False, True])
def test_training_learns_every_epoch(streamed):
    """Red vs blue images: the loss falls every epoch (the schedule never stalls at lr 0, also when
    a streamed set's length is unknown) and the probe separates the training set."""
    from clipkit.data.eval_sets import ClassificationSet
    from clipkit.eval.vqt import predict, train_vqt

    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(32):
        image = 0.3 * torch.randn(3, 32, 32, generator=g)
        image[i % 2] += 1.0  # class 0 red-ish, class 1 green-ish
        samples.append((image, i % 2, f"img{i}"))
    dataset = Streamed(samples) if streamed else samples
    data = ClassificationSet("toy", "/toy", "train", dataset, ["red", "green"], [], None)
    visual = tower()
    probe = VQTProbe.for_tower(visual, num_queries=2, num_classes=2)
    opts = dict(device=torch.device("cpu"), batch_size=8, workers=0)
    fit = train_vqt(
        probe,
        visual,
        data,
        **opts,
        epochs=4,
        lr=3e-2,
        weight_decay=0.0,
        seed=0,
        max_bad_fraction=0.0,
    )
    losses = fit["train_loss"]
    assert fit["num_train"] == 32 and len(losses) == 4
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    logits, labels = predict(probe, visual, data, **opts)
    assert (logits.argmax(1) == labels).float().mean() == 1.0
