"""OpenCLIP text towers built in code (SD2's ViT-H-14, SDXL's second encoder ViT-bigG-14).

Module names are open_clip's, so `cond_stage_model.model.` (SD2) or
`conditioner.embedders.1.model.` (SDXL) + a state-dict key is the checkpoint key:
`token_embedding`, `positional_embedding`, `transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc,
mlp.c_proj}`, `ln_final`, `text_projection`, `logit_scale`. Attention is `torch.nn.MultiheadAttention`
as in open_clip, with the fused `attn.in_proj_weight` (3d, d) (q, k, v row blocks) and
`attn.out_proj`; MHA's forward reads both weights directly (not through `out_proj`'s forward), so
adapters change them as weights (`networks/mha.py`), never by forward hooks.

How the two hosts read it (`encode`):
- SD2 (ldm `FrozenOpenCLIPEmbedder`, layer "penultimate"): every block but the last, then
  `ln_final` -> (B, 77, d) crossattn.
- SDXL te2 (sgm `FrozenOpenCLIPEmbedder2`, layer "penultimate", pooled): the hidden state before
  the last block, no `ln_final` -> crossattn part; pooled = `ln_final(last)[eos] @ text_projection`
  -> (B, embed) into the vector `y`. The end-of-text token has the largest id, so
  `ids.argmax(-1)` finds it, as open_clip does.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class OpenClipSpec:
    """width d, layers, heads; mlp = 4 d in both real towers; embed: text_projection's columns."""

    width: int
    layers: int
    heads: int
    mlp: int
    embed: int
    vocab: int
    positions: int = 77


# Tiny widths follow specs.py's tiny UNets: SD2 context 32; SDXL context 64 = te1 32 + te2 32,
# adm 128 = pooled 32 + 6 x 16 size features. Layer counts stay real (names and counts of the
# checkpoint keys and of the LoRA modules depend on them).
OPENCLIP_SPECS = {
    ("sd2", "real"): OpenClipSpec(width=1024, layers=24, heads=16, mlp=4096, embed=1024, vocab=49408),
    ("sd2", "tiny"): OpenClipSpec(width=32, layers=24, heads=2, mlp=128, embed=32, vocab=514),
    ("sdxl", "real"): OpenClipSpec(width=1280, layers=32, heads=20, mlp=5120, embed=1280, vocab=49408),
    ("sdxl", "tiny"): OpenClipSpec(width=32, layers=32, heads=2, mlp=128, embed=32, vocab=514),
}


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block on (L, B, d) (open_clip's sequence-first layout):
    x + attn(ln_1(x)), then + mlp(ln_2(x)) with exact GELU."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp)),
            ("gelu", nn.GELU()),
            ("c_proj", nn.Linear(mlp, width)),
        ]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        mask = None if attn_mask is None else attn_mask.to(h.dtype)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp) for _ in range(layers)])


class OpenCLIPText(nn.Module):
    """The text half of an open_clip `CLIP` (the visual tower is not in SD checkpoints).

    `attn_mask` (77, 77) is a non-persistent buffer (causal: -inf above the diagonal), so the state
    dict holds exactly the checkpoint's tensors.
    """

    def __init__(self, spec: OpenClipSpec):
        super().__init__()
        self.spec = spec
        d = spec.width
        self.transformer = Transformer(d, spec.layers, spec.heads, spec.mlp)
        self.token_embedding = nn.Embedding(spec.vocab, d)
        self.positional_embedding = nn.Parameter(torch.empty(spec.positions, d))
        self.ln_final = nn.LayerNorm(d)
        self.text_projection = nn.Parameter(torch.empty(d, spec.embed))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("attn_mask", causal_mask(spec.positions), persistent=False)
        self.init_weights()

    @property
    def num_layers(self) -> int:
        return self.spec.layers

    @torch.no_grad()
    def init_weights(self) -> None:
        """open_clip's init scales, plus small random biases and norms (ours stand in for trained
        weights, so nothing is left at an exact 0 or 1 that would hide a wrong bias or norm path)."""
        if self.positional_embedding.device.type == "meta":
            return
        d, n = self.spec.width, self.spec.layers
        attn_std = d ** -0.5
        proj_std = d ** -0.5 * (2 * n) ** -0.5
        fc_std = (2 * d) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=d ** -0.5)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            for bias in (block.attn.in_proj_bias, block.attn.out_proj.bias, block.mlp.c_fc.bias,
                         block.mlp.c_proj.bias):
                nn.init.normal_(bias, std=0.02)
        for ln in [self.ln_final] + [m for b in self.transformer.resblocks for m in (b.ln_1, b.ln_2)]:
            nn.init.normal_(ln.weight, mean=1.0, std=0.02)
            nn.init.normal_(ln.bias, std=0.02)

    def encode(self, ids: torch.Tensor, layer: str = "penultimate", final_norm: bool = True,
               pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids (B, 77) long -> (hidden (B, 77, d), pooled (B, embed) or None).

        layer: 'last' or 'penultimate' (the input of the last block; the last block then runs only
        when `pooled` needs it). final_norm: apply `ln_final` to the returned hidden state (SD2
        yes, SDXL no). pooled: `ln_final(last hidden)` at the end token, times `text_projection`.
        """
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', not {layer!r}")
        x = self.token_embedding(ids) + self.positional_embedding.to(self.token_embedding.weight.dtype)
        x = x.permute(1, 0, 2)  # (L, B, d), as open_clip runs its blocks
        mask = self.attn_mask[: x.shape[0], : x.shape[0]]
        blocks = self.transformer.resblocks
        stop = len(blocks) - 1 if layer == "penultimate" and not pooled else len(blocks)
        hidden = None
        for i in range(stop):
            if i == len(blocks) - 1 and layer == "penultimate":
                hidden = x
            x = blocks[i](x, mask)
        if hidden is None:
            hidden = x
        hidden = hidden.permute(1, 0, 2)
        if final_norm:
            hidden = self.ln_final(hidden)
        pool = None
        if pooled:
            last = self.ln_final(x.permute(1, 0, 2))
            eos = ids.argmax(dim=-1)
            pool = last[torch.arange(last.shape[0], device=last.device), eos] @ self.text_projection
        return hidden, pool

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, 77) -> ln_final(last hidden state) (B, 77, d)."""
        return self.encode(ids, layer="last", final_norm=True)[0]


def causal_mask(n: int) -> torch.Tensor:
    """(n, n) float: 0 on and below the diagonal, -inf above (open_clip's `build_attention_mask`)."""
    return torch.full((n, n), float("-inf")).triu_(1)


def build_openclip_text(arch: str = "sd2", size: str = "tiny", seed: int | None = 0,
                        device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> OpenCLIPText:
    """An `OpenCLIPText` with open_clip's names; random weights from `seed`, eval mode. `meta`
    allocates nothing (for shape checks of the real size)."""
    spec = OPENCLIP_SPECS[(arch, size)]
    device = torch.device(device)
    if device.type == "meta":
        with torch.device("meta"):
            model = OpenCLIPText(spec)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else seed)
            model = OpenCLIPText(spec)
        model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


__all__ = ["OPENCLIP_SPECS", "OpenClipSpec", "OpenCLIPText", "ResidualAttentionBlock",
           "build_openclip_text", "causal_mask"]
