"""Class embeddings built several classes per text forward equal one class per forward."""

import torch
import torch.nn.functional as F

from clipkit.config import ModelConfig
from clipkit.data.tokenize import build_tokenizer
from clipkit.eval import zero_shot
from clipkit.models import factory


def test_batched_class_embeddings_equal_one_class_at_a_time(monkeypatch):
    cfg = ModelConfig(name="test")
    model = factory.build(cfg).eval()
    tokenizer = build_tokenizer(factory.preprocess(cfg.arch))
    classes = [f"class {i}" for i in range(7)]
    templates = ["a photo of a {c}.", "a drawing of a {c}.", "{c}"]
    monkeypatch.setattr(zero_shot, "PROMPTS_PER_FORWARD", 7)  # 2 classes per forward: 4 groups
    cpu = torch.device("cpu")
    batched = zero_shot.zero_shot_classifier(model, tokenizer, classes, templates, cpu, False)
    with torch.no_grad():
        naive = []
        for name in classes:
            feats = model.encode_text(tokenizer([t.format(c=name) for t in templates]))
            naive.append(F.normalize(F.normalize(feats, dim=-1).mean(0), dim=-1))
    assert batched.shape == (naive[0].shape[0], len(classes))
    torch.testing.assert_close(batched, torch.stack(naive, dim=1), atol=1e-6, rtol=1e-5)
