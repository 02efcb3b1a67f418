"""Adapter networks: pick targets, build one adapter per target, attach them with hooks.

Algorithms (one file each; each module's state dict holds exactly its file tensors):

| algo   | module            | targets                                                          |
|--------|-------------------|------------------------------------------------------------------|
| lora   | LoRAModule        | transformer blocks (+ 3x3 convs etc. when conv_rank > 0)         |
| locon  | LoRAModule        | transformer blocks + convs (conv_rank, else rank)                |
| loha   | LoHaModule        | as lora (convs when conv_rank > 0, with conv_rank / conv_alpha)   |
| lokr   | LoKrModule        | as loha                                                          |
| dora   | DoRAModule        | as loha                                                          |
| full   | FullModule        | as loha                                                          |
| ia3    | IA3Module         | attention to_k / to_v (output), ff.net.2 (input); text encoders  |
|        |                   | k_proj / v_proj (output), mlp.fc2 (input): LyCORIS's ia3 preset  |
| oft    | OFTModule         | as loha (convs when conv_rank > 0; oft_block_size sizes the      |
| boft   | BOFTModule        | rotation blocks of every layer, conv_rank only switches convs on)|
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ALGOS, NetworkConfig
from ..errors import UserError
from .base import AdapterModule, AdapterNetwork, part_of
from .dora import DoRAModule
from .full import FullModule
from .ia3 import IA3Module
from .loha import LoHaModule
from .lokr import LoKrModule
from .lora import LoRAModule
from .oft import BOFTModule, OFTModule
from .targets import Target, block_id, block_value, find_targets, parse_block_values

__all__ = ["AdapterModule", "AdapterNetwork", "LoRAModule", "LoHaModule", "LoKrModule",
           "IA3Module", "DoRAModule", "FullModule", "OFTModule", "BOFTModule", "Target",
           "build_network", "find_targets",
           "part_of", "SUPPORTED_ALGOS", "IA3_OUTPUT_SUFFIXES", "IA3_INPUT_SUFFIXES",
           "algo_of_tensors", "adapter_from_tensors", "BASE_DEPENDENT_ALGOS"]

SUPPORTED_ALGOS = ALGOS  # the settings table names them
# algorithms whose delta is computed from the base weight itself (merge needs the weight; a
# merge of LoRA files cannot hold them)
BASE_DEPENDENT_ALGOS = ("ia3", "dora", "oft", "boft")

# IA3 targets by kohya name ending: scaled on the output (keys, values) or on the input (the
# feed-forward's hidden activation, i.e. the input of its second layer).
IA3_OUTPUT_SUFFIXES = ("_to_k", "_to_v", "_self_attn_k_proj", "_self_attn_v_proj")
IA3_INPUT_SUFFIXES = ("_ff_net_2", "_mlp_fc2")


def build_network(roots: dict[str, nn.Module], arch: str, cfg: NetworkConfig, seed: int,
                  dtype: torch.dtype = torch.float32) -> AdapterNetwork:
    """One adapter per target; initial weights depend only on `seed` (the global RNG is untouched).

    LoRA targets the transformer blocks; LoCon (or any rank-based algorithm with conv_rank > 0)
    adds the 3x3 convs (and the res blocks' other layers) with their own rank / alpha.
    """
    if cfg.algo not in SUPPORTED_ALGOS:
        raise UserError("network.algo",
                        f"{cfg.algo!r} is not available; choose one of {', '.join(SUPPORTED_ALGOS)}")
    conv_rank = cfg.conv_rank or (cfg.rank if cfg.algo == "locon" else 0)
    conv_alpha = cfg.conv_alpha if cfg.conv_rank else cfg.alpha
    if cfg.algo == "ia3":
        targets = [t for t in find_targets(roots, arch, cfg.train_on, conv=False,
                                           block_filter=cfg.block_filter)
                   if t.kind == "linear" and t.name.endswith(IA3_OUTPUT_SUFFIXES + IA3_INPUT_SUFFIXES)]
    else:
        targets = find_targets(roots, arch, cfg.train_on, conv=conv_rank > 0,
                               block_filter=cfg.block_filter)
    if not targets:
        raise UserError("network.block_filter" if cfg.block_filter else "network.train_on",
                        "selects no module to train")
    block_ranks = parse_block_values(cfg.block_ranks, "network.block_ranks", integer=True)
    parse_block_values(cfg.block_lr_weights, "network.block_lr_weights")  # fail early
    generator = torch.Generator().manual_seed(int(seed) % (2**63))
    adapters = []
    for t in targets:
        conv3 = t.kind == "conv3x3"
        block = block_id(t.path) if t.part == "unet" else ""
        rank, alpha = (conv_rank, conv_alpha) if conv3 else \
            (int(block_value(block, block_ranks, cfg.rank)), cfg.alpha)
        a = _make_adapter(cfg, t, rank, alpha, dtype)
        a.block = block
        a.reset_parameters(generator)
        adapters.append(a)
    return AdapterNetwork(adapters, arch=arch, algo=cfg.algo)


def _make_adapter(cfg: NetworkConfig, t: Target, rank: int, alpha: float,
                  dtype: torch.dtype) -> AdapterModule:
    drop = dict(dropout=cfg.dropout, rank_dropout=cfg.rank_dropout,
                module_dropout=cfg.module_dropout, dtype=dtype)
    if cfg.algo in ("lora", "locon"):
        return LoRAModule(t.name, t.module, rank, alpha, **drop)
    if cfg.algo == "loha":
        return LoHaModule(t.name, t.module, rank, alpha, use_tucker=cfg.use_tucker, **drop)
    if cfg.algo == "lokr":
        return LoKrModule(t.name, t.module, rank, alpha, factor=cfg.lokr_factor,
                          decompose_both=cfg.decompose_both, full_matrix=cfg.full_matrix,
                          use_tucker=cfg.use_tucker, **drop)
    if cfg.algo == "dora":
        return DoRAModule(t.name, t.module, rank, alpha, **drop)
    if cfg.algo == "ia3":
        return IA3Module(t.name, t.module, on_input=t.name.endswith(IA3_INPUT_SUFFIXES), **drop)
    if cfg.algo == "full":
        return FullModule(t.name, t.module, **drop)
    if cfg.algo in ("oft", "boft"):
        cls = OFTModule if cfg.algo == "oft" else BOFTModule
        try:
            return cls(t.name, t.module, cfg.oft_block_size, constraint=cfg.oft_constraint,
                       rescaled=cfg.oft_rescaled, **drop)
        except ValueError as e:  # a layer BOFT's butterfly cannot split
            raise UserError("network.oft_block_size", f"{e}; choose another size") from None
    raise AssertionError(cfg.algo)


def algo_of_tensors(parts: dict[str, object] | set[str]) -> str:
    """The algorithm of one module of a file, from its tensor names ('' when unknown):
    'lora' (lora_down/up; 'locon' is told apart only by kernel size), 'dora', 'loha', 'lokr',
    'ia3', 'full', 'oft', 'boft'. OFT and BOFT share `oft_blocks` and differ in its axes (3 / 4):
    `parts` values may be tensors or shapes; from names alone (a set, or values without a shape)
    `oft_blocks` reads as 'oft'."""
    names = set(parts)
    if "lora_down.weight" in names and "lora_up.weight" in names:
        return "dora" if "dora_scale" in names else "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= names:
        return "loha"
    if ("lokr_w1" in names or {"lokr_w1_a", "lokr_w1_b"} <= names) and \
            ("lokr_w2" in names or {"lokr_w2_a", "lokr_w2_b"} <= names):
        return "lokr"
    if "weight" in names and "on_input" in names:
        return "ia3"
    if "diff" in names:
        return "full"
    if "oft_blocks" in names:
        axes = _axes(parts["oft_blocks"]) if isinstance(parts, dict) else None
        return {None: "oft", 3: "oft", 4: "boft"}.get(axes, "")
    return ""


def _axes(value: object) -> int | None:
    """The number of axes of a tensor or a shape; None for anything else."""
    if isinstance(value, torch.Tensor):
        return value.dim()
    if isinstance(value, (tuple, list, torch.Size)):
        return len(value)
    return None


_FROM_TENSORS = {"dora": DoRAModule, "loha": LoHaModule, "lokr": LoKrModule, "ia3": IA3Module,
                 "full": FullModule, "oft": OFTModule, "boft": BOFTModule}


def adapter_from_tensors(name: str, base: nn.Module, parts: dict[str, torch.Tensor],
                         **options) -> AdapterModule:
    """A module with the layout (algorithm, rank, factors) of one module of a file, holding the
    file's values: for applying or continuing a file of any algorithm. `options`: dropout,
    rank_dropout, module_dropout, dtype."""
    algo = algo_of_tensors(parts)
    if not algo:
        raise UserError("lora", f"{name}: tensors ({', '.join(sorted(parts))}) are not a module "
                                f"of {', '.join(SUPPORTED_ALGOS)}")
    if algo == "lora":
        down = parts["lora_down.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        module = LoRAModule(name, base, down.shape[0], alpha, **options)
    else:
        module = _FROM_TENSORS[algo].from_tensors(name, base, parts, **options)
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(parts)), sorted(set(parts) - set(own))
    if missing or unexpected:
        raise UserError("lora", f"{name}: {algo} tensors do not fit the module "
                                f"(missing {missing}, unexpected {unexpected})")
    with torch.no_grad():
        for key, value in parts.items():
            if tuple(own[key].shape) != tuple(value.shape):
                raise UserError("lora", f"{name}.{key}: shape {tuple(value.shape)} in the file, "
                                        f"{tuple(own[key].shape)} for this model")
            own[key].copy_(value.to(own[key].dtype))
    return module
