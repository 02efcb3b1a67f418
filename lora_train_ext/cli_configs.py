"""Command line: presets and importing kohya configs.

    python -m lora_train_ext presets [list|show NAME|save NAME --config FILE|delete NAME]
            [--dir DIR]
    python -m lora_train_ext import-config FILE [--out config.toml] [--force] [--json]

`add_config_commands(sub)` adds the subcommands to the main parser's subparsers and returns
{command: handler}; cli.py hooks them in.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from .core.errors import UserError


def add_config_commands(sub) -> dict[str, Callable[[Any], int]]:
    pre = sub.add_parser("presets", help="list, show, save and delete presets",
                         description="Built-in presets and your own (TOML files in a presets "
                                     "folder: --dir, else $LORA_TRAIN_PRESETS_DIR, else presets/ "
                                     "in the extension's folder). Built-ins cannot be changed.")
    pre.add_argument("action", nargs="?", default="list", choices=("list", "show", "save",
                                                                   "delete"))
    pre.add_argument("name", nargs="?", default=None, help="the preset (show, save, delete)")
    pre.add_argument("--config", metavar="FILE", default=None,
                     help="save: the run config (JSON or TOML, e.g. a run's NAME.config.toml) "
                          "whose settings the preset keeps")
    pre.add_argument("--dir", metavar="DIR", default=None, help="the presets folder")
    pre.add_argument("--json", action="store_true", help="list: print one JSON object")

    imp = sub.add_parser("import-config",
                         help="import a kohya_ss GUI JSON or sd-scripts (dataset) TOML config",
                         description="Read a kohya_ss GUI config (.json), an sd-scripts "
                                     "--config_file or --dataset_config (.toml); print which of "
                                     "its keys went to which setting and which are not "
                                     "supported; write the settings as our TOML config.")
    imp.add_argument("file")
    imp.add_argument("--out", metavar="FILE", default="config.toml",
                     help="where our config goes (default: config.toml); - prints it")
    imp.add_argument("--force", action="store_true", help="replace --out if it exists")
    imp.add_argument("--json", action="store_true",
                     help="print one JSON object: config, mapped, unsupported, notes")
    return {"presets": cmd_presets, "import-config": cmd_import_config}


# -- presets ---------------------------------------------------------------------------------------
def cmd_presets(args) -> int:
    from .core import presets as P

    folder = args.dir or P.default_presets_dir()
    action, name = args.action, args.name
    if action != "list" and not name:
        raise UserError("name", f"give the preset's name: presets {action} NAME")
    if action == "list":
        if name:
            raise UserError("name", "list takes no name")
        user = P.user_presets(folder)
        if args.json:
            print(json.dumps({"builtin": list(P.PRESETS), "user": user, "dir": folder}))
        else:
            for n in P.PRESETS:
                print(f"{n}  (built-in)")
            for n in user:
                print(n)
        return 0
    if args.config is not None and action != "save":
        raise UserError("--config", f"only save takes --config, not {action}")
    if action == "show":
        print(P.show_preset(name, folder), end="")
        return 0
    if action == "delete":
        print(f"deleted {P.delete_preset(name, folder)}")
        return 0
    # save
    from .cli import _named
    from .core.config import RunConfig, read_config_file

    if not args.config:
        raise UserError("--config", "give the config to save: presets save NAME --config FILE")
    if not os.path.isfile(args.config):
        raise UserError("--config", f"file not found: {args.config}")
    raw = _named(lambda: read_config_file(args.config), "--config")
    cfg = _named(lambda: RunConfig.from_dict(raw, validate=True), "--config")
    path = P.save_preset(name, cfg, folder)
    kept = P.preset_settings(cfg)
    count = sum(len(v) for v in kept.values() if isinstance(v, dict))
    print(f"saved {path} ({count} settings that differ from the defaults)")
    return 0


# -- import-config ---------------------------------------------------------------------------------
def cmd_import_config(args) -> int:
    from .core.config import to_toml
    from .core.fsio import atomic_write_text
    from .core.kohya_import import import_kohya, is_inert

    result = import_kohya(args.file)
    cfg = result.config
    text = to_toml(cfg.to_dict())
    written = ""
    if args.out != "-":
        if os.path.exists(args.out) and not args.force:
            raise UserError("--out", f"{args.out} exists; give another --out or --force")
        atomic_write_text(args.out, text)
        written = args.out
    if args.json:
        print(json.dumps({"kind": result.kind, "config": cfg.to_dict(), "mapped": result.mapped,
                          "given": result.given, "unsupported": result.unsupported,
                          "notes": result.notes, "written": written}, default=str))
        return 0
    print(f"{args.file}: {result.kind}")
    print(f"\nmapped ({len(result.mapped)}):")
    for key, path in result.mapped.items():
        ours = ", ".join(f"{p} = {cfg.get(p)!r}" for p in path.split(", ") if _is_path(p))
        print(f"  {key} = {result.given.get(key)!r} -> {ours or path}")
    live = {k: v for k, v in result.unsupported.items() if not is_inert(v)}
    off = [k for k in result.unsupported if k not in live]
    print(f"\nnot supported, ignored ({len(live)}):")
    for key, value in live.items():
        print(f"  {key} = {value!r}")
    if off:
        print(f"\nnot supported, but off or empty in this file ({len(off)}): {', '.join(off)}")
    if result.notes:
        print("\nnotes:")
        for note in result.notes:
            print(f"  {note}")
    if written:
        print(f"\nwrote {written} (use it with --config {written})")
    else:
        print("\n" + text, end="")
    return 0


def _is_path(p: str) -> bool:
    from .core.config import SETTINGS

    return p in SETTINGS
