"""lora-train-ext: train LoRA / LyCORIS adapters inside the AUTOMATIC1111 WebUI.

`core` is host-free (torch, safetensors, numpy); `host` is the only package that imports the
WebUI; `ui` holds the gradio tab.
"""

__version__ = "0.1.0"
