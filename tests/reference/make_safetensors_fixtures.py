#!/usr/bin/env python3
"""Writes tests/data/safetensors/python_layout.safetensors with the reference `safetensors` package.

The file is committed; CI never runs this script. It checks that limoe reads what other tools write (spec
docs/cli.md). Needs torch (for BF16) and `pip install safetensors`.
test_safetensors.cpp hard-codes the values below: keep them in sync.
"""
import os

import numpy as np
import torch
from safetensors.torch import save_file

here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "..", "data", "safetensors", "python_layout.safetensors")

tensors = {
    "f32": torch.from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3) * 0.5 - 1.0),
    "f16": torch.tensor([1.0, -2.5, 65504.0, 2.0**-24, float("inf"), float("nan")], dtype=torch.float16),
    "bf16": torch.tensor([[1.0, -2.5], [3.140625, -0.0]], dtype=torch.bfloat16),
    "f64": torch.tensor([[1.5, -0.25]], dtype=torch.float64),
    "i32": torch.tensor([[-3, 7], [2**31 - 1, -(2**31)]], dtype=torch.int32),
    "i64": torch.tensor([5, -6, 123456789], dtype=torch.int64),
    "i64_big": torch.tensor([1, 2**40], dtype=torch.int64),
    "u8": torch.tensor([0, 255, 7], dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "logit_scale": torch.tensor(2.5, dtype=torch.float32),
    "rank5": torch.arange(4, dtype=torch.float32).reshape(1, 2, 1, 1, 2),
    "empty": torch.zeros((0, 3), dtype=torch.float32),
}
save_file(tensors, out, metadata={"format": "limoe", "format_version": "1", "note": "written by safetensors"})
print("wrote", os.path.relpath(out), os.path.getsize(out), "bytes")
