"""Module counts and file sizes per arch x algorithm, at real size, without any weights.

    python -m lora_train_ext.bench.file_sizes [--rank 16] [--save-dtype fp16] [--json] [--oft]

The real SD1.5 / SD2.1 / SDXL UNets and text encoders are built on the `meta` device from the real
configs (`specs.py`, `clip.py`, `openclip.py`), the network is built as a training run builds it
(`build_network`, one NetworkConfig per algorithm: rank = alpha = --rank, LoKr / LoHa defaults,
LoCon's convs at the same rank), and the file's size is computed from what `save_lora` would
write: every tensor of the network's state dict, floating ones at the save dtype except the
`alpha` scalars (fp32), plus the safetensors header (8-byte length + JSON of names, dtypes,
shapes and data offsets, space-padded to 8 bytes). Metadata is left out (a run adds 3-5 KB);
`safetensors_file_bytes(specs, metadata)` counts it when given.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..core.config import NetworkConfig
from ..core.lora_file import SAVE_DTYPES
from ..core.models.specs import build_unet
from ..core.models.tiny import build_text_encoders
from ..core.networks import SUPPORTED_ALGOS, build_network, part_of

ARCHES = ("sd1", "sd2", "sdxl")
# safetensors' dtype names, in the order its writer sorts tensors (larger dtypes first, then by
# name); the order only moves data offsets, whose digits count in the header
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.int64: "I64", torch.float32: "F32", torch.int32: "I32",
    torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def saved_tensor_specs(state: dict[str, torch.Tensor],
                       save_dtype: str = "fp16") -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """key -> (dtype, shape) as `save_lora` writes the tensors (meta tensors are fine)."""
    dtype = SAVE_DTYPES[save_dtype]
    out = {}
    for key, t in state.items():
        keep = not t.is_floating_point() or key.endswith(".alpha")
        out[key] = (t.dtype if keep else dtype, tuple(t.shape))
    return out


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def safetensors_file_bytes(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                           metadata: dict[str, str] | None = None) -> int:
    """The size of the .safetensors file holding these tensors (and metadata)."""
    rank = list(SAFETENSORS_DTYPES)
    order = sorted(specs, key=lambda k: (rank.index(specs[k][0]), k))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in order:
        dtype, shape = specs[key]
        size = _nbytes(dtype, shape)
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return 8 + len(text) + (-len(text)) % 8 + offset


def real_roots(arch: str) -> dict[str, torch.nn.Module]:
    """The real-size UNet and text encoders on the meta device, by part."""
    return {"unet": build_unet(arch, "real", device="meta"),
            **build_text_encoders(arch, "real", device="meta")}


def network_config(algo: str, rank: int) -> NetworkConfig:
    return NetworkConfig(algo=algo, rank=rank, alpha=float(rank))


def measure(roots: dict[str, torch.nn.Module], arch: str, algo: str, rank: int,
            save_dtype: str = "fp16", config: NetworkConfig | None = None) -> dict:
    """One row: modules per part, tensors, parameters and file bytes of the saved network
    (`config`: the network's settings; default `network_config(algo, rank)`)."""
    network = build_network(roots, arch, config or network_config(algo, rank), seed=0)
    state = {k[len("adapters."):]: v for k, v in network.state_dict().items()}
    specs = saved_tensor_specs(state, save_dtype)
    modules: dict[str, int] = {}
    for a in network:
        modules[part_of(a.name)] = modules.get(part_of(a.name), 0) + 1
    return {"arch": arch, "algo": algo, "rank": rank, "modules": modules,
            "module_count": sum(modules.values()), "tensors": len(specs),
            "params": sum(t.numel() for t in state.values()),
            "file_bytes": safetensors_file_bytes(specs)}


def table(rank: int = 16, arches=ARCHES, algos=SUPPORTED_ALGOS, save_dtype: str = "fp16"):
    rows = []
    for arch in arches:
        roots = real_roots(arch)
        for algo in algos:
            rows.append(measure(roots, arch, algo, rank, save_dtype))
    return rows


def oft_table(arches=ARCHES, save_dtype: str = "fp16") -> list[dict]:
    """OFT and BOFT with their default settings (NetworkConfig's: block size 16, no
    constraint, not rescaled, the linear layers only (conv_rank 0), UNet and text encoders),
    per arch at real width: modules, tensors, parameters, file bytes."""
    rows = []
    for arch in arches:
        roots = real_roots(arch)
        for algo in ("oft", "boft"):
            defaults = NetworkConfig(algo=algo)
            row = measure(roots, arch, algo, defaults.rank, save_dtype, config=defaults)
            row["block_size"] = defaults.oft_block_size
            rows.append(row)
    return rows


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def format_table(rows: list[dict]) -> str:
    lines = ["| arch | algo | modules (unet + te) | tensors | parameters | file |",
             "|------|------|---------------------|---------|------------|------|"]
    for r in rows:
        parts = " + ".join(f"{r['modules'][p]}" for p in sorted(r["modules"],
                                                                 key=lambda p: (p != "unet", p)))
        lines.append(f"| {r['arch']} | {r['algo']} | {r['module_count']} ({parts}) | "
                     f"{r['tensors']:,} | {r['params']:,} | {_size(r['file_bytes'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_train_ext.bench.file_sizes",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default="fp16")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.add_argument("--oft", action="store_true",
                        help="OFT and BOFT at their default settings (block size 16) instead")
    args = parser.parse_args(argv)
    if args.oft:
        rows = oft_table(save_dtype=args.save_dtype)
        if args.json:
            for r in rows:
                print(json.dumps(r))
        else:
            print(f"OFT / BOFT defaults (block size {rows[0]['block_size']}, linear layers, "
                  f"UNet + text encoders), {args.save_dtype}, real-size models; sizes without "
                  "metadata")
            print(format_table(rows))
        return 0
    rows = table(args.rank, save_dtype=args.save_dtype)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"rank {args.rank} (alpha = rank), {args.save_dtype}, real-size models, "
              "UNet + text encoders; sizes without metadata")
        print(format_table(rows))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
