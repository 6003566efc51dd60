"""Bit-packing in np.packbits order (first element in the most significant bit), in torch
so it runs where the masks are (CPU or GPU)."""

import numpy as np
import torch

_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_rows(masks: torch.Tensor) -> torch.Tensor:
    """(T, n) bool -> (T, ceil(n / 8)) uint8, zero padded at the end."""
    if masks.device.type == "cpu":
        # numpy's packbits is this exact layout and many times faster than the arithmetic below
        return torch.from_numpy(np.packbits(masks.numpy(), axis=1))
    return pack_rows_torch(masks)


def pack_rows_torch(masks: torch.Tensor) -> torch.Tensor:
    """pack_rows in torch arithmetic, for masks on an accelerator."""
    t, n = masks.shape
    pad = -n % 8
    if pad:
        masks = torch.nn.functional.pad(masks, (0, pad))
    groups = masks.view(t, -1, 8).to(torch.uint8)
    return (groups * _WEIGHTS.to(masks.device)).sum(dim=2, dtype=torch.uint8)


def row_counts(masks: torch.Tensor, packed: torch.Tensor) -> np.ndarray:
    """Set bits per row, (T,) int64; from the packed rows on the CPU (padding bits are 0)."""
    if packed.device.type == "cpu" and hasattr(np, "bitwise_count"):
        return np.bitwise_count(packed.numpy()).sum(axis=1, dtype=np.int64)
    return masks.sum(dim=1).cpu().numpy().astype(np.int64)


def unpack(packed: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 -> (count,) bool; inverse of one row of pack_rows."""
    bits = packed.to(torch.uint8)[:, None].bitwise_and(_WEIGHTS.to(packed.device)[None, :]) != 0
    return bits.reshape(-1)[:count]


def packbits_numpy(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask.astype(bool))
