"""What the sparsify-then-merge methods share (DARE, Breadcrumbs, DELLA; not a method itself).

**The random numbers** are counter-based: the 32 bits of element i of tensor `name` for task t
(its 0-based position in the config's task list) are a pure function of (seed, t, name, i), so any
shard size, chunk size, number of workers or device gives the same bytes. With
`fmix32` MurmurHash3's 32-bit finalizer and all arithmetic mod 2^32:

    h  = fmix32(seed_lo ^ 0x6A09E667); h = fmix32(h ^ seed_hi ^ 0xBB67AE85)   (seed = seed_hi * 2^32 + seed_lo)
    h  = fmix32(h ^ t);                h = fmix32(h ^ crc32(utf-8 name))
    k1 = h,                            k2 = fmix32(h ^ 0x5BE0CD19)
    bits(i) = fmix32(fmix32(i_lo * 0x9E3779B1 + k1) ^ k2 ^ (i_hi * 0x27D4EB2F))   (i = i_hi * 2^32 + i_lo)

and the uniform draw is u(i) = bits(i) / 2^32 in [0, 1). "Keep with probability p" is u < p. In
torch every step is int64 arithmetic on values below 2^49 (a 32-bit product is taken in two 16-bit
halves), so nothing overflows and CPU and CUDA give the same bits.

**Exact L1 norms** (`rescale: l1`): sum_i |x_i| of float32 values as integers, one int64 sum of
mantissas per exponent, so the norm (and the rescale factor from it) is the same for any chunking,
order or device.

**Sign consensus** (the `*_ties` variants, mergekit's `get_mask(method="sum")`): per element the
majority sign is +1 where sum_t x_t >= 0 (0 counts as +1), else -1; entries whose sign equals it
are summed (`merge: sum`) or averaged over their count, at least 1 (`merge: mean`).

**Ranks** by magnitude per row: descending by |x|, ties by index (the lower index ranks higher).
"""

from __future__ import annotations

import math
import zlib
from fractions import Fraction

import numpy as np
import torch

from mergeflow.workers.reading import TensorAccess

RNG = "fmix32x2-counter/v1"  # the generator above; recorded in the manifest next to the seed
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1
_HIGH = 0x27D4EB2F


# --------------------------------------------------------------------------- random numbers


def _fmix32_int(h: int) -> int:
    h &= _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def stream_key(seed: int, task: int, tensor: str) -> tuple[int, int]:
    """(k1, k2) of task `task`'s stream over tensor `tensor`."""
    h = _fmix32_int((seed & _M32) ^ 0x6A09E667)
    h = _fmix32_int(h ^ ((seed >> 32) & _M32) ^ 0xBB67AE85)
    h = _fmix32_int(h ^ (task & _M32))
    h = _fmix32_int(h ^ zlib.crc32(tensor.encode()))
    return h, _fmix32_int(h ^ 0x5BE0CD19)


def _mul32_(x: torch.Tensor, c: int, tmp: torch.Tensor) -> torch.Tensor:
    """x = x * c mod 2^32 in place, for int64 x in [0, 2^32) and c < 2^32, with c in 16-bit halves
    (x * c_lo + ((x * c_hi) mod 2^16) * 2^16): every intermediate is below 2^49."""
    torch.mul(x, c >> 16, out=tmp).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(c & 0xFFFF).add_(tmp).bitwise_and_(_M32)


def _fmix32_(h: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's fmix32 of int64 h in [0, 2^32), in place."""
    h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=tmp))
    _mul32_(h, 0x85EBCA6B, tmp)
    h.bitwise_xor_(torch.bitwise_right_shift(h, 13, out=tmp))
    _mul32_(h, 0xC2B2AE35, tmp)
    return h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=tmp))


def random_bits(key: tuple[int, int], offset: int, n: int, device) -> torch.Tensor:
    """bits(i) for i = offset .. offset + n - 1, as int64 values in [0, 2^32)."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(_bits_numpy(key, offset, n).astype(np.int64))
    return _bits_torch(key, offset, n, device)


def _bits_torch(key: tuple[int, int], offset: int, n: int, device) -> torch.Tensor:
    """The generator in int64 torch ops (any device): 32-bit products in 16-bit halves."""
    k1, k2 = key
    idx = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    tmp = torch.empty_like(idx)
    x = torch.bitwise_and(idx, _M32)
    _mul32_(x, _GOLDEN, tmp).add_(k1).bitwise_and_(_M32)
    _fmix32_(x, tmp).bitwise_xor_(k2)
    if offset + n > 1 << 32:  # elements past 2^32 (a zero high half changes nothing)
        x.bitwise_xor_(_mul32_(idx.bitwise_right_shift_(32), _HIGH, tmp))
    return _fmix32_(x, tmp)


def _fmix32_np(h: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    np.bitwise_xor(h, np.right_shift(h, 16, out=tmp), out=h)
    np.multiply(h, np.uint32(0x85EBCA6B), out=h)
    np.bitwise_xor(h, np.right_shift(h, 13, out=tmp), out=h)
    np.multiply(h, np.uint32(0xC2B2AE35), out=h)
    return np.bitwise_xor(h, np.right_shift(h, 16, out=tmp), out=h)


def _bits_numpy(key: tuple[int, int], offset: int, n: int) -> np.ndarray:
    """The same generator on the CPU in numpy's uint32, whose products wrap mod 2^32 by definition:
    a third of the operations on half the bytes of the int64 path (tests check they agree)."""
    k1, k2 = key
    idx = np.arange(offset, offset + n, dtype=np.uint64)
    x = idx.astype(np.uint32)  # the low 32 bits
    tmp = np.empty_like(x)
    np.multiply(x, np.uint32(_GOLDEN), out=x)
    np.add(x, np.uint32(k1), out=x)
    _fmix32_np(x, tmp)
    np.bitwise_xor(x, np.uint32(k2), out=x)
    if offset + n > 1 << 32:
        high = np.right_shift(idx, np.uint64(32)).astype(np.uint32)
        np.bitwise_xor(x, np.multiply(high, np.uint32(_HIGH), out=high), out=x)
    return _fmix32_np(x, tmp)


def uniform(key: tuple[int, int], offset: int, n: int, device) -> torch.Tensor:
    """u(i) = bits(i) / 2^32, float64 (exact)."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(_bits_numpy(key, offset, n).astype(np.float64) * 2.0**-32)
    return _bits_torch(key, offset, n, device).to(torch.float64).mul_(2.0**-32)


def bernoulli_keep(key: tuple[int, int], offset: int, n: int, p: float, device) -> torch.Tensor:
    """u(i) < p as a bool mask: the integer test bits(i) < ceil(p * 2^32), the same thing."""
    limit = math.ceil(p * 2.0**32)
    if torch.device(device).type == "cpu":
        bits = _bits_numpy(key, offset, n)
        return torch.from_numpy(bits < limit if limit < 1 << 32 else np.ones(n, dtype=bool))
    return _bits_torch(key, offset, n, device) < limit


# --------------------------------------------------------------------------- exact L1 norms


def l1_buckets(x: torch.Tensor) -> torch.Tensor:
    """(R, 256) int64 per row of x (R, n) float32: per exponent the sum of the mantissas of |x|
    (implicit bit included). Sum of |x| = sum_e bucket[e] * 2^(max(e, 1) - 150), exactly."""
    rows = x.reshape(x.shape[0], -1)
    out = torch.zeros((rows.shape[0], 256), dtype=torch.int64, device=x.device)
    for r, row in enumerate(rows):
        bits = row.abs().view(torch.int32).to(torch.int64)
        exp = torch.bitwise_right_shift(bits, 23)
        mant = torch.bitwise_and(bits, 0x7FFFFF).add_(torch.gt(exp, 0).to(torch.int64).mul_(0x800000))
        out[r].index_add_(0, exp, mant)
    return out


def l1_value(buckets: np.ndarray) -> int:
    """sum |x| * 2^149 as an exact integer, from one row of l1_buckets."""
    return sum(int(c) << (max(e, 1) - 1) for e, c in enumerate(buckets) if c)


def l1_scales(blocks, masked, tasks: int, device) -> tuple[float, ...]:
    """Per task ||tau_t||_1 / ||m_t * tau_t||_1 over a tensor, exact: `blocks` yields (offset, taus)
    over the whole tensor, `masked(taus, offset)` the same rows with the mask applied, unrescaled."""
    before = torch.zeros((tasks, 256), dtype=torch.int64, device=device)
    after = torch.zeros_like(before)
    for lo, taus in blocks:
        before += l1_buckets(taus)
        after += l1_buckets(masked(taus, lo))
    b, a = before.cpu().numpy(), after.cpu().numpy()
    return tuple(l1_factor(l1_value(b[i]), l1_value(a[i])) for i in range(tasks))


def l1_factor(before: int, after: int, eps: float = 1e-7) -> float:
    """mergekit's rescale: ||tau||_1 / ||m * tau||_1 (both from l1_value), 1 when either is below
    eps; returned as the float32 the kernels multiply by."""
    limit = Fraction(eps) * (1 << 149)
    if before < limit or after < limit:
        return 1.0
    return float(np.float32(float(Fraction(before, after))))


# --------------------------------------------------------------------------- ranks and rows


def descending_ranks(mag: torch.Tensor) -> torch.Tensor:
    """Per row of mag (R, w), each element's 0-based rank by decreasing magnitude, ties by index."""
    order = torch.sort(mag, dim=1, descending=True, stable=True).indices
    positions = torch.arange(mag.shape[1], device=mag.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def rank_window(mag: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Bool mask of the entries of mag (n,) whose rank by decreasing magnitude, ties by index, lies
    in [lo, hi): what descending_ranks gives, from two selections (O(n)) instead of a sort."""
    return _top(mag, hi) & ~_top(mag, lo)


def _top(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The k entries of highest rank: all above the k-th largest value, and of the entries equal to
    it the ones with the lowest indices, as many as are needed."""
    n = mag.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=mag.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=mag.device)
    v = torch.kthvalue(mag, n - k + 1).values
    top = mag > v
    equal = mag == v
    need = k - int(top.sum())
    if need >= int(equal.sum()):  # every tie is in (the usual case for float values)
        return top.logical_or_(equal)
    top[torch.nonzero(equal).squeeze(1)[:need]] = True
    return top


def row_width(shape: tuple[int, ...]) -> int:
    """Rows are slices along the last dimension; a 1-D tensor is one row, a 0-D one a row of one."""
    return shape[-1] if shape else 1


def row_blocks(access: TensorAccess):
    """(lo, hi, base, taus) over blocks of whole rows (see row_width); nothing for an empty tensor."""
    if access.job.numel == 0:
        return iter(())
    if len(access.job.shape) == 0:
        return access.chunks()
    return access.row_chunks()


def whole_flat(access: TensorAccess) -> tuple[torch.Tensor, torch.Tensor]:
    """(base (n,), taus (T, n)) of the whole tensor, flattened."""
    base, taus = access.whole()
    return base.reshape(-1), taus.reshape(taus.shape[0], -1)


def largest_tensor(run) -> int:
    return max((i.numel for i in run.plan.base.tensors.values()), default=0)


# --------------------------------------------------------------------------- merging


def task_sum(rows) -> torch.Tensor:
    """sum_t rows[t] in task order (float32)."""
    acc = rows[0].clone()
    for x in rows[1:]:
        acc += x
    return acc


def consensus_merge(rows, merge: str) -> torch.Tensor:
    """mergekit's sign consensus and disjoint merge over sparsified rows (list or (T, n)).

    With signs s in {-1, +1}, max(x * s, 0) is |x| where x agrees with s and 0 elsewhere; the
    agreeing magnitudes are summed in task order and multiplied by s once (exact: rounding is
    symmetric), which equals summing the agreeing x themselves."""
    summed = task_sum(rows)
    signs = torch.ge(summed, 0.0).to(summed.dtype).mul_(2.0).sub_(1.0)  # 0 -> +1
    magnitude = torch.zeros_like(summed)
    count = torch.zeros_like(summed) if merge == "mean" else None
    agree = torch.empty_like(summed)
    for x in rows:
        torch.mul(x, signs, out=agree).clamp_min_(0.0)
        magnitude += agree
        if count is not None:
            count += torch.sign(agree)
    total = magnitude.mul_(signs).add_(0.0)  # + 0.0: a -0.0 becomes +0.0
    if count is not None:
        total /= count.clamp_min_(1.0)
    return total


def merge_rows(rows, consensus: bool, merge: str = "sum") -> torch.Tensor:
    return consensus_merge(rows, merge) if consensus else task_sum(rows).add_(0.0)


# --------------------------------------------------------------------------- parameters


def default_alpha(params, mean: float, total: float) -> None:
    """alpha None -> one task's scale with merge mean, the sum's otherwise."""
    if params.alpha is None:
        object.__setattr__(params, "alpha", mean if getattr(params, "merge", "sum") == "mean" else total)


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise ValueError(f"seed: must be an integer in [0, 2^64), got {seed!r}")


def rng_manifest(params) -> dict:
    return {"rng": {"generator": RNG, "seed": params.seed, "key": "seed, task index, crc32(tensor name), element"}}


def rng_describe(manifest: dict) -> list[str]:
    rng = manifest.get("rng")
    if not rng:
        return []
    return [f"random      seed {rng['seed']} ({rng['generator']}, keyed by {rng['key']})"]
