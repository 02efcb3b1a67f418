"""The precision names a user gives (`fp32`, `bf16`, `fp16`) as torch dtypes: one map for
training, saving, merging and the benchmarks."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
