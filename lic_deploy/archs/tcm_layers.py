"""TCM's building blocks (Liu, Sun, Katto, CVPR 2023), written from the paper and the facts in
../shared/ARCHITECTURES.md; module and parameter names follow the official checkpoints' key layout.

Layout: `WindowAttention` and `SwinLayer` work on channels-last tensors [B, H, W, C]; `ConvTransBlock`,
`SwinPair` and `SWAtten` on [B, C, H, W]. H and W must be multiples of the window size (TCM pads images to
multiples of 128 pixels, at least 256, which guarantees it at every stage).
"""

from __future__ import annotations

import torch
from compressai.layers import AttentionBlock, ResidualBlock, conv1x1
from torch import Tensor, nn


def _check_heads(dim: int, head_dim: int) -> int:
    if dim % head_dim:
        raise ValueError(f"{dim} channels cannot be split into heads of {head_dim}")
    return dim // head_dim


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows of `window` x `window` tokens, with a learned
    relative-position bias; `shifted` rolls the map by window/2 first (and back after) and masks the token pairs
    that the roll brought together from opposite borders.

    Parameters (official names): `embedding_layer` (Linear C -> 3C: q, k, v, each heads x head_dim),
    `relative_position_params` [heads, 2w-1, 2w-1], `linear` (output projection C -> C).
    """

    def __init__(self, dim: int, head_dim: int, window: int, shifted: bool) -> None:
        super().__init__()
        self.heads = _check_heads(dim, head_dim)
        self.head_dim, self.window, self.shifted = head_dim, window, shifted
        self.scale = head_dim**-0.5
        self.embedding_layer = nn.Linear(dim, 3 * dim)
        self.relative_position_params = nn.Parameter(torch.zeros(self.heads, 2 * window - 1, 2 * window - 1))
        nn.init.trunc_normal_(self.relative_position_params, std=0.02)
        self.linear = nn.Linear(dim, dim)
        rows = torch.arange(window).repeat_interleave(window)  # token t = (row, col) in raster order
        cols = torch.arange(window).repeat(window)
        self.register_buffer("bias_index", ((rows[:, None] - rows[None] + window - 1) * (2 * window - 1)
                                            + cols[:, None] - cols[None] + window - 1), persistent=False)

    def relative_bias(self) -> Tensor:
        """[heads, w*w, w*w]: bias[h, i, j] = params[h, r_i - r_j + w - 1, c_i - c_j + w - 1]."""
        return self.relative_position_params.flatten(1)[:, self.bias_index]

    def shift_mask(self, h: int, w: int, device: torch.device) -> Tensor:
        """[nW, w*w, w*w] bool, True where a query and a key came from different sides of the roll's wrap."""
        win, shift = self.window, self.window // 2

        def region(n: int) -> Tensor:  # 0: not wrapped, 1: window's first part of the last row, 2: wrapped
            i = torch.arange(n, device=device)
            return (i >= n - win).long() + (i >= n - shift).long()

        reg = region(h)[:, None] * 3 + region(w)[None, :]  # [H, W]
        reg = reg.reshape(h // win, win, w // win, win).permute(0, 2, 1, 3).reshape(-1, win * win)
        return reg[:, :, None] != reg[:, None, :]

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.attend(self.embedding_layer(x))[0])

    def attend(self, qkv: Tensor) -> tuple[Tensor, Tensor]:
        """Attention on projected tokens [B, H, W, 3C] (q, k, v; per token, so projecting before the window
        partition is the same): (output before the projection [B, H, W, C], the logits [B, heads, nW, T, T]
        with bias and mask). The integer path calibrates its scales on both."""
        b, h, w, c3 = qkv.shape
        win, heads, hd, c = self.window, self.heads, self.head_dim, c3 // 3
        if self.shifted:
            qkv = torch.roll(qkv, shifts=(-(win // 2), -(win // 2)), dims=(1, 2))
        t = qkv.reshape(b, h // win, win, w // win, win, c3).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, win * win, c3)
        qkv = t.reshape(b, t.shape[1], win * win, 3, heads, hd).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, nW, T, hd]
        sim = q @ k.transpose(-1, -2) * self.scale + self.relative_bias()[None, :, None]
        if self.shifted:
            sim = sim.masked_fill(self.shift_mask(h, w, t.device)[None, None], float("-inf"))
        out = (sim.softmax(dim=-1) @ v).permute(0, 2, 3, 1, 4).reshape(b, -1, win * win, c)  # heads outermost
        out = out.reshape(b, h // win, w // win, win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        if self.shifted:
            out = torch.roll(out, shifts=(win // 2, win // 2), dims=(1, 2))
        return out, sim


class SwinLayer(nn.Module):
    """Pre-norm transformer layer on [B, H, W, C]: x + WMSA(LN(x)), then x + MLP(LN(x)), MLP = C -> 4C, GELU, C.
    Official names: `ln1`, `msa`, `ln2`, `mlp.0`, `mlp.2` (TCM's `Block`)."""

    def __init__(self, dim: int, head_dim: int, window: int, shifted: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.msa = WindowAttention(dim, head_dim, window, shifted)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.msa(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ConvTransBlock(nn.Module):
    """TCM's mixed block on [B, 2C, H, W]: a 1x1 conv, then half the channels through a residual conv block (plus
    one more identity) and half through a Swin layer, concatenated, a 1x1 conv, added to the input."""

    def __init__(self, dim: int, head_dim: int, window: int, shifted: bool) -> None:
        super().__init__()
        self.dim = dim
        self.trans_block = SwinLayer(dim, head_dim, window, shifted)
        self.conv1_1 = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.conv1_2 = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.conv_block = ResidualBlock(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        conv_x, trans_x = torch.split(self.conv1_1(x), (self.dim, self.dim), dim=1)
        conv_x = self.conv_block(conv_x) + conv_x
        trans_x = self.trans_block(trans_x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.conv1_2(torch.cat((conv_x, trans_x), dim=1))


class SwinPair(nn.Module):
    """A windowed then a shifted-window Swin layer on [B, C, H, W] (TCM's `SwinBlock`: `block_1`, `block_2`)."""

    def __init__(self, dim: int, head_dim: int, window: int) -> None:
        super().__init__()
        self.block_1 = SwinLayer(dim, head_dim, window, shifted=False)
        self.block_2 = SwinLayer(dim, head_dim, window, shifted=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.block_1(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class SWAtten(AttentionBlock):
    """TCM's per-slice attention module: 1x1 in to `inter` channels, out = a * sigmoid(b) + identity with
    a = conv_a(x) and b = conv_b(SwinPair(x)) (CompressAI's AttentionBlock branches), then 1x1 out."""

    def __init__(self, channels: int, inter: int, head_dim: int = 16, window: int = 8) -> None:
        super().__init__(N=inter)
        self.non_local_block = SwinPair(inter, head_dim, window)
        self.in_conv = conv1x1(channels, inter)
        self.out_conv = conv1x1(inter, channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_conv(x)
        out = self.conv_a(x) * torch.sigmoid(self.conv_b(self.non_local_block(x))) + x
        return self.out_conv(out)
