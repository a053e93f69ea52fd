import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from clipkit.losses import clip_loss


@pytest.mark.parametrize("batch,dim,scale", [(8, 16, 1.0), (33, 64, 14.3), (5, 8, 100.0)])
def test_clip_loss_equals_open_clip(batch, dim, scale):
    img = F.normalize(torch.randn(batch, dim), dim=-1)
    txt = F.normalize(torch.randn(batch, dim), dim=-1)
    s = torch.tensor(scale)
    ours = clip_loss(img, txt, s)
    ref = ClipLoss()(img, txt, s)
    assert abs(ours.item() - ref.item()) < 1e-6


def test_clip_loss_perfect_alignment_is_small():
    x = F.normalize(torch.eye(6), dim=-1)
    assert clip_loss(x, x, torch.tensor(100.0)).item() < 1e-3
    # uniform logits give log(B)
    z = torch.zeros(6, 6)
    assert clip_loss(
        F.normalize(z + 1, dim=-1), F.normalize(z + 1, dim=-1), torch.tensor(1.0)
    ).item() == pytest.approx(torch.log(torch.tensor(6.0)).item(), abs=1e-6)
