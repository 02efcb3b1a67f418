"""The Stable Diffusion VAE (ldm `AutoencoderKL`) in code, with the LDM module paths.

`first_stage_model.` + a state-dict key is the checkpoint key (SD1.5, SD2.1 and SDXL VAEs share
names and shapes). Images are (B, 3, H, W) in [-1, 1]; latents (B, 4, H/8, W/8) before scaling:
the UNet sees `posterior.sample() * spec.scale_factor`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .unet import Upsample  # the same nearest x2 + 3x3 `conv` as the UNet's

if TYPE_CHECKING:
    from .specs import VAESpec


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """(B, in, H, W) -> (B, out, H, W); `nin_shortcut` (1x1) only when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3)  # (B, 1, H*W, C)
                   for t in (self.q(hn), self.k(hn), self.v(hn)))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 conv with no padding (ldm's asymmetric
    downsampling: H -> H/2 for even H, the same taps as the trained weights expect)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks) and an optional `downsample` / `upsample`."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, dropout)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2*z_channels, H/f, W/f): mean and log-variance stacked."""

    def __init__(self, spec: VAESpec):
        super().__init__()
        g = spec.norm_groups
        self.conv_in = nn.Conv2d(spec.in_channels, spec.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch_in = spec.ch
        for level, mult in enumerate(spec.ch_mult):
            ch_out = spec.ch * mult
            blocks = []
            for _ in range(spec.num_res_blocks):
                blocks.append(ResnetBlock(ch_in, ch_out, g, spec.dropout))
                ch_in = ch_out
            stage = _Level(blocks)
            if level != len(spec.ch_mult) - 1:
                stage.downsample = Downsample(ch_in)
            self.down.append(stage)
        self.mid = _Mid(ch_in, g, spec.dropout)
        self.norm_out = _norm(ch_in, g)
        self.conv_out = nn.Conv2d(ch_in, 2 * spec.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h*f, w*f). `up[i]` is level i (0 = full resolution),
    built and run from the deepest level up, as in ldm."""

    def __init__(self, spec: VAESpec):
        super().__init__()
        g = spec.norm_groups
        ch_in = spec.ch * spec.ch_mult[-1]
        self.conv_in = nn.Conv2d(spec.z_channels, ch_in, 3, padding=1)
        self.mid = _Mid(ch_in, g, spec.dropout)
        stages: list[nn.Module] = []
        for level in reversed(range(len(spec.ch_mult))):
            ch_out = spec.ch * spec.ch_mult[level]
            blocks = []
            for _ in range(spec.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch_in, ch_out, g, spec.dropout))
                ch_in = ch_out
            stage = _Level(blocks)
            if level != 0:
                stage.upsample = Upsample(ch_in)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(ch_in, g)
        self.conv_out = nn.Conv2d(ch_in, spec.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior. parameters: (B, 2*C, h, w), mean then log-variance on dim 1."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise; the noise is drawn on `generator`'s device, then moved."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device,
                            dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def kl(self) -> torch.Tensor:
        """KL to a standard normal, summed per sample: (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """encode: images (B, 3, H, W) in [-1, 1] -> DiagonalGaussian over (B, 4, H/8, W/8);
    decode: unscaled latents -> images. `scale_factor` is the spec's (latents the UNet sees are
    unscaled * scale_factor)."""

    def __init__(self, spec: VAESpec):
        super().__init__()
        self.spec = spec
        self.scale_factor = spec.scale_factor
        self.encoder = Encoder(spec)
        self.decoder = Decoder(spec)
        self.quant_conv = nn.Conv2d(2 * spec.z_channels, 2 * spec.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(spec.embed_dim, spec.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        posterior = self.encode(x)
        return self.decode(posterior.sample() if sample else posterior.mode())
