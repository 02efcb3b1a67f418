"""The Stable Diffusion UNet in code, with the WebUI's LDM module paths.

Same structure as ldm's `openaimodel.UNetModel` (SD1.5, SD2.1) and sgm's (SDXL), so that
`model.diffusion_model.` + a state-dict key is the checkpoint key, a checkpoint loads with
`load_state_dict(strict=True)`, and module paths
(`input_blocks.1.1.transformer_blocks.0.attn1.to_q`) are the ones LoRA files and the WebUI's Lora
extension name.

Each top-level block (`input_blocks[i]`, `middle_block`, `output_blocks[i]`) is a `BlockSequence`
called as `block(x, emb, context)`, so a trainer can wrap any of them (gradient checkpointing)
without knowing what is inside.

Weights are initialised randomly everywhere. ldm zero-initialises the last conv of every ResBlock,
every `proj_out` and `out.2`; we do not, because these models stand in for trained ones: with a
zero `out.2` the output is constant and no gradient reaches an adapter.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .specs import UNetSpec


def timestep_embedding(timesteps: torch.Tensor, dim: int,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding as ldm's (`repeat_only=False`): (B,) -> (B, dim) float32, cos half
    first (ldm's order; diffusers calls this flip_sin_to_cos=True)."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * steps / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


# Wide 3x3 convolutions on small feature maps run as one matrix product on the CPU (Conv3x3).
# False: always torch's convolution (the benchmark's `--plain conv_matmul`).
CONV_AS_MATMUL = True
# From measurements on the CPU (fp32, oneDNN, one thread): with 1280 or more channels in and out
# and at most 8x8 outputs, unfold + one matrix product took 0.29-0.58 of the time of torch's
# convolution, forward and backward; below 1280 channels or above 8x8 outputs it was slower.
MATMUL_MIN_CHANNELS = 1280
MATMUL_MAX_OUTPUT_PIXELS = 64


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled()


class Conv3x3(nn.Conv2d):
    """nn.Conv2d (same parameters, same state-dict keys) that runs as unfold + one matrix product
    where that is faster: on the CPU, in float32 outside autocast, 1280+ channels in and out, at
    most 8x8 outputs (the lowest UNet levels at 256-512 px). The result equals torch's
    convolution to float32 rounding; everywhere else it is torch's convolution."""

    def _out_size(self, x: torch.Tensor) -> tuple[int, int]:
        return tuple((x.shape[2 + i] + 2 * self.padding[i] - self.kernel_size[i])
                     // self.stride[i] + 1 for i in (0, 1))

    def _as_matmul(self, x: torch.Tensor) -> bool:
        if not CONV_AS_MATMUL or x.device.type != "cpu" or x.dim() != 4:
            return False
        if x.dtype != torch.float32 or self.weight.dtype != torch.float32 \
                or _cpu_autocast():
            return False
        if self.in_channels < MATMUL_MIN_CHANNELS or self.out_channels < MATMUL_MIN_CHANNELS \
                or self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros" \
                or not isinstance(self.padding, tuple):
            return False
        h, w = self._out_size(x)
        return h * w <= MATMUL_MAX_OUTPUT_PIXELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._as_matmul(x):
            return super().forward(x)
        h, w = self._out_size(x)
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)
        out = torch.matmul(self.weight.reshape(self.out_channels, -1), cols)
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.reshape(x.shape[0], self.out_channels, h, w)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (ldm's `normalization`), for half-precision models."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class TimestepBlock(nn.Module):
    """A child that takes the time embedding: forward(x, emb)."""


class ContextBlock(nn.Module):
    """A child that takes the text conditioning: forward(x, context)."""


class BlockSequence(nn.Sequential):
    """One top-level UNet block (ldm's `TimestepEmbedSequential`): passes `emb` to ResBlocks,
    `context` to transformers and only `x` to the rest (conv_in, Downsample, Upsample)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, ContextBlock):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (`op`), padding 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv3x3(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv (`conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv3x3(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling lacks bf16 kernels on older torch
            x = x.float()
        x = F.interpolate(x, scale_factor=2.0, mode="nearest").to(dtype)
        return self.conv(x)


class ResBlock(TimestepBlock):
    """x: (B, in, H, W), emb: (B, time_embed_dim) -> (B, out, H, W)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int,
                 dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels),
            nn.SiLU(),
            Conv3x3(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            Conv3x3(out_channels, out_channels, 3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when `context` is None.

    x: (B, N, query_dim), context: (B, M, context_dim) -> (B, N, query_dim).
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b = q.shape[0]
        q, k, v = (t.reshape(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
                   for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3])
        return self.to_out(out)


class GEGLU(nn.Module):
    """(..., dim_in) -> (..., dim_out): a Linear to 2*dim_out, one half gated by GELU(other)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(
            GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU MLP; pre-LayerNorm residuals. (B, N, dim)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int,
                 dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim=context_dim, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(ContextBlock):
    """x: (B, C, H, W), context: (B, M, context_dim) -> (B, C, H, W).

    proj_in/proj_out are 1x1 convs applied before flattening (SD1), or Linears applied after
    (SD2, SDXL: `use_linear`); the weights differ only by the trailing 1x1.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 groups: int, use_linear: bool, dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, dropout)
            for _ in range(depth)
        )
        if use_linear:
            self.proj_out = nn.Linear(inner_dim, channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        # contiguous as ldm's rearrange(...).contiguous(): a transposed view here would make the
        # activations channels-last, and every later 3x3 conv would copy its weight to match
        x = x.flatten(2).transpose(1, 2).contiguous()  # (B, H*W, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class UNetModel(nn.Module):
    """forward(x (B, in, H, W), timesteps (B,), context (B, M, context_dim), y (B, adm) or None)
    -> (B, out, H, W). H and W must be multiples of 2**(levels - 1) (8 for SD1/SD2, 4 for SDXL).
    """

    def __init__(self, spec: UNetSpec):
        super().__init__()
        self.spec = spec
        mc = spec.model_channels
        groups = spec.norm_groups
        emb_dim = spec.time_embed_dim
        self.model_channels = mc

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, groups, spec.dropout)

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = spec.heads_for(ch)
            return SpatialTransformer(ch, heads, dim_head, depth, spec.context_dim, groups,
                                      spec.use_linear, spec.dropout)

        self.time_embed = nn.Sequential(
            nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if spec.adm_in_channels is not None:
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(spec.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim),
            ))
        else:
            self.label_emb = None

        depths = spec.level_depths
        self.input_blocks = nn.ModuleList(
            [BlockSequence(nn.Conv2d(spec.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch = mc
        for level, mult in enumerate(spec.channel_mult):
            for _ in range(spec.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mc * mult)]
                ch = mc * mult
                if depths[level]:
                    layers.append(transformer(ch, depths[level]))
                self.input_blocks.append(BlockSequence(*layers))
                skip_channels.append(ch)
            if level != len(spec.channel_mult) - 1:
                self.input_blocks.append(BlockSequence(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = BlockSequence(
            res(ch, ch), transformer(ch, spec.middle_depth), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(spec.channel_mult))):
            for i in range(spec.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if depths[level]:
                    layers.append(transformer(ch, depths[level]))
                if level and i == spec.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(BlockSequence(*layers))

        self.out = nn.Sequential(
            GroupNorm32(groups, ch), nn.SiLU(), nn.Conv2d(mc, spec.out_channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.label_emb is not None:
            if y is None:
                raise ValueError(
                    f"this UNet needs y (B, {self.spec.adm_in_channels}): pooled text embedding "
                    "and size/crop embeddings (SDXL)")
            emb = emb + self.label_emb(y.to(emb.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context)
        return self.out(h)
