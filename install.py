"""Run by the WebUI at start (not with --skip-install).

The extension needs no new package: everything it uses ships with the WebUI. This only adds the
small, pure-Python optimizer packages (Prodigy, DAdaptation, schedule-free, Lion) when they are
missing, each with --no-deps so nothing the WebUI pins (torch, transformers, gradio, numpy) can
move. Set LORA_TRAIN_EXT_NO_INSTALL=1 to skip even that. A failed install is reported and
skipped: the optimizer is then listed as unavailable in the tab, with its install command.
"""

import os

OPTIONAL = {  # import name -> pip requirement
    "prodigyopt": "prodigyopt",
    "dadaptation": "dadaptation",
    "schedulefree": "schedulefree",
    "lion_pytorch": "lion-pytorch",
}
NEVER = ("torch", "transformers", "gradio", "numpy", "diffusers")


def missing_packages(is_installed) -> list[str]:
    return [req for name, req in OPTIONAL.items() if not is_installed(name)]


def main() -> None:
    if os.environ.get("LORA_TRAIN_EXT_NO_INSTALL"):
        return
    import launch  # the WebUI's own helpers

    for req in missing_packages(launch.is_installed):
        if any(req.startswith(n) for n in NEVER):
            continue
        try:
            launch.run_pip(f"install --no-deps {req}", f"lora-train-ext optional package {req}")
        except Exception as e:  # never stop the WebUI from starting
            print(f"[lora-train-ext] could not install {req} ({e}); its optimizer stays unavailable")


if __name__ == "__main__":  # the WebUI runs this file as a script (PYTHONPATH = its root)
    main()
