"""Describe a LoRA / LyCORIS file: arch, algorithm, ranks, alphas, modules per part, metadata,
and which loaders will accept it (every module name must map onto a real module)."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Mapping, Sequence

from safetensors import safe_open

from .errors import UserError
from .lora_file import read_metadata
from .networks import algo_of_tensors
from .networks.base import part_of

# loaded by others, not made here: old LyCORIS OFT, R itself under `oft_diag` (the WebUI 1.10.1
# reads it; ComfyUI and LyCORIS 4 no longer do)
OTHER_ALGO_MARKERS = (("oft_diag", "oft_diag"),)
OFT_FAMILY = ("oft", "boft")


@lru_cache(maxsize=None)
def known_module_kinds(arch: str) -> dict[str, str]:
    """kohya module name -> 'linear' / 'conv1x1' / 'conv3x3' for every module a file for `arch`
    may carry (from the in-code model, built on the meta device)."""
    from .models.specs import build_unet
    from .models.tiny import build_text_encoders
    from .networks.targets import find_targets

    roots = {"unet": build_unet(arch, "tiny", device="meta"),
             **build_text_encoders(arch, "tiny", device="meta")}
    return {t.name: t.kind for t in find_targets(roots, arch, "both", conv=True)}


def known_module_names(arch: str) -> frozenset[str]:
    """Every kohya module name a file for `arch` may carry (from the in-code model)."""
    return frozenset(known_module_kinds(arch))


def describe(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError("file", f"not found: {path}")
    meta = read_metadata(path)
    shapes: dict[str, list[int]] = {}
    try:
        with safe_open(path, "pt") as f:
            for key in f.keys():
                shapes[key] = list(f.get_slice(key).get_shape())
    except Exception as e:  # truncated, non-string metadata, ...: safetensors' own errors
        raise UserError("file", f"{os.path.basename(path)} cannot be read as safetensors: "
                                f"{e}") from None
    modules: dict[str, dict[str, list[int]]] = {}  # name -> tensor name -> shape
    for key in shapes:
        name, _, rest = key.partition(".")
        if not rest or not name.startswith("lora_"):
            raise UserError("file", f"{os.path.basename(path)} is not a LoRA file "
                                    f"(tensor {key!r} has no lora_unet_/lora_te_ module prefix)")
        modules.setdefault(name, {})[rest] = shapes[key]
    if not modules:
        raise UserError("file", f"{os.path.basename(path)} holds no tensors")
    module_algos = {n: _algo_of(p) for n, p in modules.items()}
    parts: dict[str, int] = {}
    for name in modules:
        parts[part_of(name)] = parts.get(part_of(name), 0) + 1
    arch = arch_of(meta, list(modules))
    kinds = _kinds(arch)
    ranks: set[int] = set()
    conv_ranks: set[int] = set()
    for name, p in modules.items():
        rank = _rank_of(module_algos[name], name, shapes)
        if rank is None:
            continue
        ranks.add(rank)
        if _is_kxk_conv(module_algos[name], name, p, shapes, kinds):
            conv_ranks.add(rank)
    ranks, conv_ranks = sorted(ranks), sorted(conv_ranks)
    alphas = _alphas(path, modules)
    unknown = _unknown_modules(arch, list(modules))
    report = {
        "file": os.path.abspath(path),
        "bytes": os.path.getsize(path),
        "arch": arch,
        "algorithm": algo_of_file(meta, shapes),
        "ranks": ranks,
        "conv_ranks": conv_ranks,
        "options": _options(module_algos, modules),
        "alphas": alphas,
        "block_sizes": sorted({p["oft_blocks"][-1] for n, p in modules.items()
                               if module_algos[n] in OFT_FAMILY}),
        "oft_over_alpha": _oft_over_alpha(path, modules, module_algos),
        "modules": parts,
        "module_count": len(modules),
        "tensor_count": len(shapes),
        "unknown_modules": unknown[:20],
        "unknown_module_count": len(unknown),
        "metadata": meta,
        "training_mode": _training_mode(meta),
    }
    report["loaders"] = loader_verdicts(report, list(modules))
    report["loader_notes"] = loader_notes(report)
    return report


def _training_mode(meta: dict[str, str]) -> dict:
    """How the file was trained (our `lora_train_ext.mode`): images, slider or difference."""
    try:
        mode = json.loads(meta.get("lora_train_ext.mode") or "{}")
    except ValueError:
        return {}
    return mode if isinstance(mode, dict) else {}


LORA_FAMILY = ("lora", "locon", "dora")  # one layout (down, up): kernel size, dora_scale tell


def algo_of_file(meta: Mapping[str, str], shapes: Mapping[str, Sequence[int]]) -> str:
    """A file's algorithm, by the one rule inspect and continue-from-file share: 'lora',
    'locon', 'loha', 'lokr', 'ia3', 'dora', 'full', 'oft', 'boft', 'oft_diag' (old LyCORIS
    OFT), 'mixed:A+B' or 'unknown'.

    Metadata first: the algorithm `ss_network_module` / `ss_network_args` state (LyCORIS names
    it; kohya's networks.lora is LoRA). Tensor shapes then, where the metadata states none, and
    inside the LoRA family, which one layout serves: a kxk conv kernel makes it LoCon, a
    `dora_scale` DoRA (LyCORIS writes DoRA as algo lora with dora_wd). `shapes`: tensor key ->
    shape, as in the file. A stated OFT whose tensors say otherwise (BOFT's 4-axis blocks, old
    LyCORIS's `oft_diag`) is what the tensors say: the loaders go by them.
    """
    stated = stated_algo(meta)
    shown = _algo_of_shapes(shapes)
    if not stated or (stated in LORA_FAMILY and shown in LORA_FAMILY) or \
            (stated in OFT_FAMILY and shown in OFT_FAMILY + ("oft_diag",)):
        return shown
    return stated


def stated_algo(meta: Mapping[str, str]) -> str:
    """The algorithm a file's metadata states ('' when it states none)."""
    module = meta.get("ss_network_module", "")
    try:
        args = json.loads(meta.get("ss_network_args") or "{}")
    except ValueError:
        args = {}
    algo = str(args.get("algo", "")) if isinstance(args, dict) else ""
    if module == "networks.lora":
        return algo if algo in ("lora", "locon") else "lora"
    if module == "networks.oft":  # kohya's own OFT
        return "oft"
    return {"diag-oft": "oft"}.get(algo, algo)  # LyCORIS's name


def _algo_of_shapes(shapes: Mapping[str, Sequence[int]]) -> str:
    modules: dict[str, dict[str, Sequence[int]]] = {}
    for key, shape in shapes.items():
        name, _, rest = key.partition(".")
        modules.setdefault(name, {})[rest] = shape
    algos = sorted({_algo_of(parts) for parts in modules.values()})
    if algos == ["lora"] and any(len(shape) == 4 and shape[2] * shape[3] > 1
                                 for key, shape in shapes.items()
                                 if key.endswith(".lora_down.weight")):
        return "locon"
    if not algos:
        return "unknown"
    return algos[0] if len(algos) == 1 else "mixed:" + "+".join(algos)


def _algo_of(parts: Mapping[str, Sequence[int]]) -> str:
    """One module's algorithm from its tensor names and shapes."""
    algo = algo_of_tensors(dict(parts))
    if algo:
        return algo
    for marker, other in OTHER_ALGO_MARKERS:
        if marker in parts:
            return other
    return "unknown"


# the tensor whose first axis is the rank, per algorithm, in order of preference (the WebUI's
# loader reads LoKr's rank from lokr_w2_b, else lokr_w1_b; full-matrix LoKr, IA3, full: none)
RANK_TENSORS = {"lora": ("lora_down.weight",), "dora": ("lora_down.weight",),
                "loha": ("hada_w1_b",), "lokr": ("lokr_w2_b", "lokr_w1_b")}


def _rank_of(algo: str, name: str, shapes: dict[str, list[int]]) -> int | None:
    for tensor in RANK_TENSORS.get(algo, ()):
        shape = shapes.get(f"{name}.{tensor}")
        if shape:
            return shape[0]
    return None


def _kinds(arch: str) -> dict[str, str]:
    try:
        return known_module_kinds(arch)
    except (NotImplementedError, KeyError, ValueError):
        return {}


def _is_kxk_conv(algo: str, name: str, parts: Mapping, shapes: dict[str, list[int]],
                 kinds: dict[str, str]) -> bool:
    """A module of a kxk conv: from the tensors' own kernel axes where they have them (LoRA's
    down, CP cores, LoKr's 4-d w2), else from the model's module kinds (LoHa / LoKr fold the
    kernel into their columns)."""
    for tensor in ("lora_down.weight", "hada_t1", "lokr_t2", "lokr_w2", "diff"):
        shape = shapes.get(f"{name}.{tensor}")
        if shape is not None and len(shape) == 4:
            return shape[2] * shape[3] > 1
    return kinds.get(name) == "conv3x3"


def _options(module_algos: dict[str, str], modules: Mapping[str, Mapping]) -> list[str]:
    """Layout options visible in the tensor names: CP/Tucker cores ('tucker'), LoKr with a
    low-rank small factor ('decompose_both') or no low-rank factor in any module ('full_matrix'),
    full with bias changes ('diff_b'), OFT / BOFT with a scale per output row ('rescaled')."""
    found = set()
    lokr = [parts for name, parts in modules.items() if module_algos[name] == "lokr"]
    for parts in modules.values():
        if "hada_t1" in parts or "lokr_t2" in parts:
            found.add("tucker")
        if "lokr_w1_a" in parts:
            found.add("decompose_both")
        if "diff_b" in parts:
            found.add("diff_b")
        if "rescale" in parts:
            found.add("rescaled")
    if lokr and all("lokr_w2" in parts for parts in lokr):
        found.add("full_matrix")
    return sorted(found)


def _oft_over_alpha(path: str, modules: Mapping[str, Mapping], algos: dict[str, str]) -> int:
    """How many OFT / BOFT modules have a constraint alpha > 0 below their |Q| (Q = B - B^T
    over all blocks): ComfyUI takes alpha itself as the bound and shrinks those rotations, where
    the WebUI and LyCORIS bound |Q| by alpha x channels."""
    count = 0
    with safe_open(path, "pt") as f:
        for name, parts in modules.items():
            if algos[name] not in OFT_FAMILY or "alpha" not in parts:
                continue
            alpha = float(f.get_tensor(f"{name}.alpha").float())
            if alpha <= 0:
                continue
            b = f.get_tensor(f"{name}.oft_blocks").double()
            if float((b - b.transpose(-1, -2)).norm()) + 1e-8 > alpha:
                count += 1
    return count


def _alphas(path: str, modules: Mapping[str, Mapping]) -> list[float]:
    values = set()
    with safe_open(path, "pt") as f:
        for name, parts in modules.items():
            if "alpha" in parts:
                values.add(round(float(f.get_tensor(f"{name}.alpha").float()), 6))
    return sorted(values)


def arch_from_version(version: str) -> str:
    """kohya's `ss_base_model_version` -> 'sd1' | 'sd2' | 'sdxl' ('' when unknown); kohya
    writes sd_v2_v / sd_v1_v for v-prediction models."""
    if version.startswith("sdxl"):
        return "sdxl"
    return "sd2" if version.startswith("sd_v2") else "sd1" if version.startswith("sd_v1") else ""


def declared_arch(meta: dict[str, str]) -> str:
    """The arch a LoRA file's metadata states ('' when it states none): kohya's base model
    version, ss_v2, or modelspec's architecture."""
    found = arch_from_version(meta.get("ss_base_model_version", ""))
    if found:
        return found
    if meta.get("ss_v2") == "True":
        return "sd2"
    spec = meta.get("modelspec.architecture", "")
    for prefix, arch in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"),
                         ("stable-diffusion-v1", "sd1")):
        if spec.startswith(prefix):
            return arch
    return ""


def arch_of(meta: dict[str, str], names: list[str]) -> str:
    """A LoRA file's arch from its metadata, else from its module names."""
    stated = declared_arch(meta)
    if stated:
        return stated
    if any(n.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks",
                         "lora_unet_middle_block", "lora_unet_output_blocks")) for n in names):
        return "sdxl"
    te_layers = {int(n.split("_layers_")[1].split("_")[0]) for n in names
                 if n.startswith("lora_te_") and "_layers_" in n}
    if te_layers and max(te_layers) >= 12:
        return "sd2"
    return "sd1"


def _unknown_modules(arch: str, names: list[str]) -> list[str]:
    try:
        known = known_module_names(arch)
    except (NotImplementedError, KeyError, ValueError):
        return []  # no in-code model for this arch yet: cannot check names
    return sorted(n for n in names if n not in known)


# Which loaders read a kohya-format file of each algorithm: "yes", or why not (algorithms not
# listed: "no"). Facts, from the loaders' sources and issue trackers:
# - webui: AUTOMATIC1111's built-in Lora extension (network_lora / _hada / _lokr / _ia3 / _full /
#   _oft); DoRA's `dora_scale` since 1.9 (PR #15160): older releases apply the plain low-rank
#   update and drop the magnitude without a word. OFT / BOFT (v1.10.1 `network_oft.py`): a
#   3-axis `oft_blocks` is OFT (blocks from its first axis, |Q| clamped to alpha x channels
#   unless alpha is 0 or absent), a 4-axis one BOFT, `rescale` applied to both, `oft_diag` (old
#   LyCORIS) taken as R itself. Its einsum mixes the fp32 R with the weight's dtype: fp32
#   weights (--no-half, CPU) or autocast (the CUDA fp16 default) work, half weights outside
#   autocast raise a dtype error per module (counted as a network error, nothing applied).
#   Earlier releases (1.7-1.9) read 3-axis `oft_blocks` only and clamp |Q| to alpha x channels
#   even at alpha 0, i.e. apply nothing then.
# - sdnext: SD.Next's lora module, the same module types (IA3 included); its `network_oft.py`
#   (the stored copy of modules/lora/) is the WebUI 1.7-1.9 one: 3-axis `oft_blocks` with a
#   clamp at alpha x channels (nothing at alpha 0), no `rescale`, no BOFT.
# - forge, comfyui: ComfyUI's LoRA code (Forge's backend uses it) reads LoRA / LoCon, LoHa,
#   LoKr, full and DoRA, not IA3: every `.weight` / `.on_input` key is reported "lora key
#   not loaded" (ComfyUI #1071, Forge #635). ComfyUI reads OFT (`weight_adapter/oft.py`:
#   3-axis `oft_blocks`, `rescale` loaded but not applied) and BOFT (`boft.py`: 4-axis, rescale
#   applied), clamping |Q| to alpha itself (not x channels; 0 = no clamp) and applying its
#   strength twice (s^2 (R - I) W; BOFT also blends each stage): equal to the WebUI at 1.
#   Forge's copy of that code (packages_3rdparty/comfyui_lora_collection) predates OFT: the
#   keys stay unloaded.
# - diffusers: `load_lora_weights` converts `lora_down` / `lora_up` / `alpha` only. It maps
#   `dora_scale` onto PEFT's magnitude vector, which is per output row, while kohya / LyCORIS
#   store it per input column, (1, in): non-square layers fail to load, square ones load wrong
#   (LyCORIS #216).
# - kohya: sd-scripts' `networks.lora` reads LoRA / LoCon; the others load through LyCORIS
#   (4.0: `diag-oft` / `boft` from `oft_blocks` with 3 / 4 axes, not `oft_diag`).
_ALL = ("lora", "locon", "loha", "lokr", "ia3", "dora", "full", "oft", "boft")
_NO_IA3 = "no: IA3 is not read (every key is skipped as 'lora key not loaded')"
_NO_OFT_FORGE = "no: Forge's loader (ComfyUI's code of mid-2024) has no OFT / BOFT; the keys " \
                "stay unloaded"
_NO_OFT_DIAG = "no: old LyCORIS OFT (oft_diag) is not read"
LOADER_SUPPORT: dict[str, dict[str, str]] = {
    "webui": {**{a: "yes" for a in _ALL}, "oft_diag": "yes"},
    "forge": {**{a: "yes" for a in _ALL}, "ia3": _NO_IA3, "oft": _NO_OFT_FORGE,
              "boft": _NO_OFT_FORGE, "oft_diag": _NO_OFT_DIAG},
    "sdnext": {**{a: "yes" for a in _ALL}, "oft_diag": "yes",
               "boft": "no: SD.Next's OFT reads 3-axis oft_blocks only"},
    "comfyui": {**{a: "yes" for a in _ALL}, "ia3": _NO_IA3, "oft_diag": _NO_OFT_DIAG},
    "diffusers": {"lora": "yes", "locon": "yes",
                  "dora": "no: dora_scale is per input column here, PEFT's magnitude per output "
                          "row (fails on non-square layers, wrong on square ones)"},
    "kohya": {"lora": "yes", "locon": "yes",
              **{a: "yes (with LyCORIS)" for a in _ALL if a not in ("lora", "locon")}},
}
LOADER_NOTES = {
    "dora": "DoRA: WebUI releases before 1.9 and loaders that read only lora_up / lora_down "
            "drop dora_scale and apply the plain low-rank update, without a warning",
    "ia3": "IA3: applied by the WebUI's built-in Lora extension and SD.Next only; ComfyUI and "
           "Forge skip it, diffusers refuses it",
    "oft": "OFT: the WebUI 1.10 and ComfyUI apply it (ComfyUI scales by strength twice: equal "
           "at strength 1); WebUI 1.7-1.9 and SD.Next apply nothing when alpha (the "
           "constraint) is 0; Forge skips it",
    "boft": "BOFT: the WebUI 1.10 and ComfyUI apply it (equal at strength 1); earlier WebUI "
            "releases, SD.Next and Forge do not",
}


def _oft_verdicts(report: dict, verdicts: dict[str, str], algos: list[str]) -> None:
    """What the file's own values change for OFT / BOFT (`report`'s alphas, options and
    oft_over_alpha): a 0 constraint in SD.Next, rescale in ComfyUI (OFT) and SD.Next, a
    constraint ComfyUI reads as a tighter bound."""
    oft = "oft" in algos
    rescaled = "rescaled" in report.get("options", [])
    alphas = report.get("alphas", [])
    if oft and verdicts.get("sdnext") == "yes":
        if not alphas or min(alphas) <= 0:
            verdicts["sdnext"] = "no: alpha (the constraint) is 0 or absent; SD.Next clamps the " \
                                 "rotation to alpha x channels, i.e. to nothing"
        elif rescaled:
            verdicts["sdnext"] = "partial: SD.Next ignores rescale"
    if verdicts.get("comfyui") == "yes":
        if oft and rescaled:
            verdicts["comfyui"] = "partial: ComfyUI loads rescale for OFT but does not apply it"
        elif report.get("oft_over_alpha"):
            verdicts["comfyui"] = (f"partial: {report['oft_over_alpha']} modules' |Q| is over "
                                   "alpha, which ComfyUI takes as the bound itself (the WebUI "
                                   "and LyCORIS: alpha x channels): smaller rotations there")


def _algo_verdict(loader: str, algos: list[str]) -> str:
    table = LOADER_SUPPORT[loader]
    for algo in algos:
        verdict = table.get(algo, f"no: {algo} is not supported")
        if verdict != "yes":
            return verdict
    return "yes"


def loader_verdicts(report: dict, names: list[str]) -> dict[str, str]:
    """Which tools load the file, and why not where they don't (LOADER_SUPPORT)."""
    algo, arch, unknown = report["algorithm"], report["arch"], report["unknown_module_count"]
    algos = algo[len("mixed:"):].split("+") if algo.startswith("mixed:") else [algo]
    verdicts: dict[str, str] = {}
    bad_names = f"{unknown} module names match no module of {arch}" if unknown else ""
    for loader in ("webui", "forge", "sdnext", "comfyui"):
        verdicts[loader] = "partial: " + bad_names if bad_names else _algo_verdict(loader, algos)
    if not bad_names and set(algos) & set(OFT_FAMILY):
        _oft_verdicts(report, verdicts, algos)
    if bad_names:
        verdicts["diffusers"] = "partial: " + bad_names
    elif _algo_verdict("diffusers", algos) != "yes":
        verdict = _algo_verdict("diffusers", algos)
        verdicts["diffusers"] = verdict if "dora" in algos else \
            f"no: load_lora_weights takes LoRA/LoCon, not {algo}"
    elif arch in ("sd1", "sd2") and any(n.startswith("lora_unet_input_blocks") for n in names):
        verdicts["diffusers"] = "no: SD1/SD2 UNet keys must use diffusers-style names"
    else:
        verdicts["diffusers"] = "yes"
    if bad_names:
        verdicts["kohya"] = verdicts["webui"]
    elif all(a in ("lora", "locon") for a in algos):
        verdicts["kohya"] = verdicts["diffusers"]
    else:
        verdicts["kohya"] = _algo_verdict("kohya", [a for a in algos if a not in ("lora", "locon")])
    return verdicts


def algo_loader_verdicts(algo: str) -> dict[str, str]:
    """What `loader_verdicts` says of a file of one algorithm whose module names all fit its
    model, before a file exists (the tab shows it beside the algorithm choice). KeyError for
    an algorithm not in the table. A file's own values can still lower a verdict (OFT's
    alpha, rescale): `inspect` on the file tells."""
    if algo not in _ALL:
        raise KeyError(algo)
    report = {"algorithm": algo, "arch": "", "unknown_module_count": 0, "alphas": [1.0],
              "options": []}
    return loader_verdicts(report, [])


def loader_notes(report: dict) -> list[str]:
    algo = report["algorithm"]
    algos = algo[len("mixed:"):].split("+") if algo.startswith("mixed:") else [algo]
    return [LOADER_NOTES[a] for a in algos if a in LOADER_NOTES]


def format_report(report: dict) -> str:
    meta = report["metadata"]
    lines = [
        f"file:       {report['file']} ({report['bytes']:,} bytes)",
        f"arch:       {report['arch']}",
        f"algorithm:  {report['algorithm']}",
        f"rank:       {', '.join(map(str, report['ranks'])) or '-'}"
        + (f" (conv {', '.join(map(str, report['conv_ranks']))})" if report["conv_ranks"] else ""),
        f"alpha:      {', '.join(f'{a:g}' for a in report['alphas']) or '-'}",
        *([f"blocks:     {', '.join(map(str, report['block_sizes']))} (OFT block size)"]
          if report.get("block_sizes") else []),
        *([f"options:    {', '.join(report['options'])}"] if report.get("options") else []),
        "modules:    " + ", ".join(f"{k} {v}" for k, v in sorted(report["modules"].items()))
        + f" (total {report['module_count']}, {report['tensor_count']} tensors)",
    ]
    if report["unknown_module_count"]:
        lines.append(f"unknown:    {report['unknown_module_count']} module names, e.g. "
                     + ", ".join(report["unknown_modules"][:3]))
    lines.append("loaders:")
    lines += [f"  {k + ':':<11}{v}" for k, v in report["loaders"].items()]
    lines += [f"  note: {n}" for n in report.get("loader_notes", [])]
    interesting = ("ss_output_name", "ss_base_model_version", "ss_steps", "ss_network_module",
                   "ss_network_args", "ss_optimizer", "ss_learning_rate", "ss_sd_model_name",
                   "modelspec.architecture", "modelspec.title", "sshs_model_hash")
    mode = report.get("training_mode") or {}
    if mode.get("mode", "images") != "images":
        lines.append("made by:    " + mode["mode"] + " training: " + ", ".join(
            f"{k} {v!r}" for k, v in mode.items() if k != "mode" and v not in ("", None)))
    lines.append(f"metadata:   {len(meta)} keys")
    for k in interesting:
        if k in meta:
            lines.append(f"  {k} = {meta[k]}")
    return "\n".join(lines)
