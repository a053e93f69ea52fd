"""Hugging Face text towers from a local directory (`--text-tower hf:DIR`) and LiT locking."""

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from clipkit import checkpoint
from clipkit.cli.main import cli
from clipkit.config import ConfigError, ModelConfig, OptimConfig
from clipkit.data.tokenize import build_tokenizer
from clipkit.models import factory
from clipkit.models.towers import apply_text_tower, load_text_tower_weights, lock_towers
from clipkit.train.optim import param_groups

WORDS = "a an the photo of picture image dog cat car red blue green small large bird".split()
BASE = ["--batch-size", "16", "--workers", "1", "--threads", "1", "--warmup", "1"]


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT and a WordPiece tokenizer, saved like a hub model."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("hf") / "tiny-bert"
    folder.mkdir()
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(folder)
    config = BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(1)
    BertModel(config).save_pretrained(folder)
    return folder


def _hf_state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder)).state_dict()


def test_text_tower_spec_errors(tmp_path):
    arch = factory.resolve_arch(ModelConfig(name="test"))
    with pytest.raises(ConfigError, match="expected hf:LOCAL_DIR"):
        apply_text_tower(arch, str(tmp_path))
    with pytest.raises(ConfigError, match="not found"):
        apply_text_tower(arch, f"hf:{tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="no config.json"):
        apply_text_tower(arch, f"hf:{tmp_path}")


def test_text_tower_arch_tokenizer_and_weights(hf_dir):
    cfg = ModelConfig(name="test", text_tower=f"hf:{hf_dir}")
    model = factory.build(cfg)
    text_cfg = cfg.arch["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == str(hf_dir.resolve())
    assert text_cfg["context_length"] == 16  # the preset's context, within the model's 64
    tokens = build_tokenizer(factory.preprocess(cfg.arch))(["a photo of a dog", "zebra"])
    assert tokens.shape == (2, 16)
    assert tokens[0, :7].tolist() == [2, 5, 8, 9, 5, 12, 3]  # [CLS] a photo of a dog [SEP]
    assert tokens[1, :3].tolist() == [2, 1, 3]  # unknown word -> [UNK]
    load_text_tower_weights(model, f"hf:{hf_dir}")
    saved = _hf_state(hf_dir)
    own = model.text.transformer.state_dict()
    assert own.keys() <= saved.keys()
    for key, value in own.items():
        assert torch.equal(value, saved[key]), key
    out = model(torch.randn(2, 3, 32, 32), tokens)
    assert out["text_features"].shape == (2, 32)
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(2))


def test_build_loads_pretrained_text_tower(hf_dir):
    """`factory.build` itself must load DIR's weights (open_clip builds from the config only)."""
    model = factory.build(ModelConfig(name="test", text_tower=f"hf:{hf_dir}"))
    saved = _hf_state(hf_dir)
    for key, value in model.text.transformer.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_text_tower_pretrain_cli(hf_dir, demo_root, tmp_path):
    run = tmp_path / "run"
    res = run_cli(
        "pretrain", "--data", demo_root / "train", "--out", run, "--model", "test",
        "--text-tower", f"hf:{hf_dir}", "--steps", 2, *BASE,
    )  # fmt: skip
    assert res.exit_code == 0, res.output + str(res.exception)
    state = checkpoint.load(run)
    assert state["step"] == 2
    assert any(k.startswith("text.transformer.encoder.layer.1.") for k in state["model"])


def test_text_tower_bad_dir_exits_2(tmp_path, demo_root):
    res = run_cli(
        "pretrain", "--data", demo_root / "train", "--out", tmp_path / "run", "--model", "test",
        "--text-tower", f"hf:{tmp_path}", "--steps", 1, *BASE,
    )  # fmt: skip
    assert res.exit_code == 2, (res.output, res.exception)
    assert len(res.stderr.strip().splitlines()) == 1 and "no config.json" in res.stderr


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _optimized_ids(model) -> set[int]:
    return {id(p) for g in param_groups(model, OptimConfig()) for p in g["params"]}


def test_lock_image_freezes_tower_and_leaves_optimizer(hf_dir):
    model = factory.build(ModelConfig(name="test", lock_image=True))
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for p in model.transformer.parameters())
    assert model.logit_scale.requires_grad
    optimized = _optimized_ids(model)
    assert not optimized & {id(p) for p in model.visual.parameters()}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("tower", ["image", "text"])
def test_unlocked_layers_are_the_last_blocks(tower):
    cfg = ModelConfig(name="test", **{f"lock_{tower}": True, f"lock_{tower}_unlocked_layers": 1})
    trainable = _trainable(factory.build(cfg))
    if tower == "image":
        expect = {n for n, _ in factory.build(ModelConfig(name="test")).named_parameters()}
        expect = {n for n in expect if not n.startswith("visual.")}
        expect |= {n for n in trainable if n.startswith("visual.transformer.resblocks.1.")}
        expect |= {"visual.ln_post.weight", "visual.ln_post.bias", "visual.proj"}
    else:
        expect = {n for n in trainable if n.startswith("visual.")} | {"logit_scale"}
        expect |= {n for n in trainable if n.startswith("transformer.resblocks.1.")}
        expect |= {"ln_final.weight", "ln_final.bias", "text_projection"}
    assert trainable == expect
    block1 = f"{'visual.' if tower == 'image' else ''}transformer.resblocks.1.attn.in_proj_weight"
    block0 = block1.replace("resblocks.1", "resblocks.0")
    assert block1 in trainable and block0 not in trainable


def test_lock_hf_text_tower_last_layer(hf_dir):
    cfg = ModelConfig(name="test", text_tower=f"hf:{hf_dir}", lock_text=True)
    cfg.lock_text_unlocked_layers = 1
    trainable = {n for n in _trainable(factory.build(cfg)) if n.startswith("text.")}
    assert any(n.startswith("text.transformer.encoder.layer.1.") for n in trainable)
    assert any(n.startswith("text.proj.") for n in trainable)
    assert not any(n.startswith(("text.transformer.encoder.layer.0.", "text.transformer.emb"))
                   for n in trainable)  # fmt: skip
    full = ModelConfig(name="test", text_tower=f"hf:{hf_dir}", lock_text=True)
    assert not any(n.startswith("text.") for n in _trainable(factory.build(full)))


def test_lock_errors():
    with pytest.raises(ConfigError, match="has 2 blocks"):
        factory.build(ModelConfig(name="test", lock_image=True, lock_image_unlocked_layers=3))
    msclip = factory.list_models()["msclip"]
    if not msclip:
        pytest.skip("no MS-CLIP presets")
    arch = factory.resolve_arch(ModelConfig(name=msclip[0]))
    model = factory.build_from_arch(arch)
    with pytest.raises(ConfigError, match="shares parameters"):
        lock_towers(model, ModelConfig(name=msclip[0], lock_image=True, arch=arch))


def test_lock_image_pretrain_keeps_image_weights(demo_root, tmp_path):
    run = tmp_path / "run"
    res = run_cli(
        "pretrain", "--data", demo_root / "train", "--out", run, "--model", "test",
        "--lock-image", "--steps", 3, "--save-every", 1, "--lr", "1e-2", *BASE,
    )  # fmt: skip
    assert res.exit_code == 0, res.output + str(res.exception)
    first = torch.load(run / "checkpoints" / "step-1.pt", weights_only=True)["model"]
    last = torch.load(run / "checkpoints" / "step-3.pt", weights_only=True)["model"]
    image = [k for k in first if k.startswith("visual.")]
    assert image and all(torch.equal(first[k], last[k]) for k in image)
    assert not torch.equal(first["text_projection"], last["text_projection"])
    assert not torch.equal(
        first["transformer.resblocks.0.attn.in_proj_weight"],
        last["transformer.resblocks.0.attn.in_proj_weight"],
    )
