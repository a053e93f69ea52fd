"""Building blocks of MS-CLIP (You et al., ECCV 2022, arXiv 2207.12661) outside the shared
Transformer: the TF-style LayerNorm, the vision conv stem of early specialisation (spec §2.1), the
efficient parallel branch (§3.2) and its lateral adapters (§3.4). Section numbers are those of
`methods/msclip.md`; channel ladder [W/16, W/8, W/4, W/2, W] (48..768 for ViT-B)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """TF-style LayerNorm of the official code: eps 1e-12, statistics in fp32 (§1.5)."""

    def __init__(self, width: int):
        super().__init__(width, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def channels(width: int) -> list[int]:
    return [width // 16, width // 8, width // 4, width // 2, width]  # stem and branch ladder


class StemBlock(nn.Module):
    """ReLU(BN(conv3x3_s(x)) + BN(conv1x1_s(x))): one 3x3 conv, projection shortcut (§2.1)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.downsample = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)) + self.downsample(x))


class ConvStem(nn.Module):
    """Vision slot 0: conv-BN-ReLU, 4 StemBlocks, 1x1 conv; (B, 3, H, W) -> (B, W, h, w)."""

    def __init__(self, width: int, strides: tuple[int, ...]):
        super().__init__()
        c = channels(width)
        self.conv1 = nn.Conv2d(3, c[0], 3, strides[0], 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        self.blocks = nn.ModuleList(StemBlock(c[i], c[i + 1], strides[i + 1]) for i in range(4))
        self.last_conv = nn.Conv2d(width, width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for blk in self.blocks:
            x = blk(x)
        return self.last_conv(x)


class BranchBottleneck(nn.Module):
    """Branch stages 1-4: 1x1 -> 3x3 (stride) -> 1x1 bottleneck, mid = out/2, BN eps 1e-6 (§3.2)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        mid = c_out // 2
        self.conv1, self.bn1 = nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid, eps=1e-6)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid, eps=1e-6)
        self.conv3, self.bn3 = nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out, eps=1e-6)
        self.residual_conv = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
        self.residual_bn = nn.BatchNorm2d(c_out, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
        return F.relu(y + self.residual_bn(self.residual_conv(x)))


def branch_stages(width: int, strides: tuple[int, ...]) -> nn.ModuleList:
    c = [3, *channels(width)]
    first = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, c[1], 3, strides[0], 1, bias=False),
            bn=nn.BatchNorm2d(c[1]),
            relu=nn.ReLU(inplace=True),
        )
    )
    return nn.ModuleList(
        [first, *(BranchBottleneck(c[k], c[k + 1], strides[k]) for k in range(1, 5))]
    )


class LateralAdapter(nn.Module):
    """Branch -> token-stream fusion (§3.4); the output *replaces* the tokens (no identity term)."""

    def __init__(self, branch_channels: int, width: int, kernel: int):
        super().__init__()
        self.branch_dw = nn.Conv2d(
            branch_channels, branch_channels, kernel, kernel, groups=branch_channels, bias=False
        )
        self.branch_bn = nn.BatchNorm2d(branch_channels)
        self.branch_pw = nn.Conv2d(branch_channels, width, 1, bias=False)
        self.token_dw = nn.Conv2d(width, width, 3, 1, 1, groups=width, bias=False)
        self.token_bn = nn.BatchNorm2d(width)
        self.ln = LayerNorm(width)

    def forward(self, branch: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, int]):
        B, _, W = tokens.shape  # tokens: (B, 1 + h*w, W); branch: (B, C_k, H_k, W_k)
        cls, patches = tokens[:, :1], tokens[:, 1:].transpose(1, 2).reshape(B, W, *grid)
        t = self.branch_pw(self.branch_bn(self.branch_dw(branch)))  # (B, W, h, w)
        if t.shape[-2:] != patches.shape[-2:]:
            raise ValueError(f"parallel branch gives a {tuple(t.shape[-2:])} grid, tokens {grid}")
        fused = (self.token_bn(self.token_dw(patches)) + t).flatten(2).transpose(1, 2)
        # the official code adds CLS on both paths (PRALLEL_T2B_USECLS): CLS -> LN(2 * CLS)
        return self.ln(torch.cat([2 * cls, fused], dim=1))
