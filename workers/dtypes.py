"""The safetensors dtype codes we read and write, and their torch equivalents."""

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})


def itemsize(code: str) -> int:
    return TORCH_DTYPES[code].itemsize


def is_float(code: str) -> bool:
    return code in FLOAT_CODES
