"""Realistically shaped checkpoint families for benchmarks: a Llama-style bf16 base and T
fine-tunes, sharded with `model.safetensors.index.json`, from 0.1B to 7B parameters.

What makes them realistic where it matters for merging:
- tensor names, shapes and layer structure of Hugging Face Llama checkpoints (grouped-query
  attention, SwiGLU MLP, RMSNorm scales, optionally tied embeddings), with a `config.json`
  that transformers and mergekit accept;
- task vectors that are sparse and heavy-tailed: bf16 rounds most small fine-tuning updates
  away, so a task touches a minority of weights, with Laplace magnitudes scaled per output
  row by a log-normal factor (a few channels move a lot); part of the touched coordinates is
  shared by all tasks with partly conflicting signs (what TIES and TALL masks are about).

Generation streams tensor by tensor in blocks of at most BLOCK elements and writes all T+1
checkpoints side by side, so memory stays O(BLOCK) whatever the model size, and every block
is seeded from (seed, tensor, block, task): the bytes do not depend on block order or on the
number of tasks generated (task 3 is the same in a 4-task and a 20-task family).

    .venv/bin/python bench/families.py /tmp/fam --preset 0.5b --tasks 8
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mergeflow.workers.layers import natural_key  # noqa: E402
from mergeflow.workers.safetensors_io import layout_header  # noqa: E402

BLOCK = 1 << 23  # elements generated at once: ~100 MB of float32 temporaries at most


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# Shapes of public models (untied unless the original ties): 0.1b ~ SmolLM-135M-like, 0.5b = Qwen2-0.5B's
# shapes in Llama naming, 2b = four times 0.5b's parameters (the memory-scaling check), 7b = Llama-2-7B.
PRESETS: dict[str, Preset] = {
    "tiny": Preset(hidden=64, layers=2, intermediate=160, heads=4, kv_heads=2, vocab=512, tied=False),
    "0.1b": Preset(hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, vocab=49152, tied=True),
    "0.5b": Preset(hidden=896, layers=24, intermediate=4864, heads=14, kv_heads=2, vocab=151936, tied=True),
    "1b": Preset(hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, vocab=128256, tied=True),
    "2b": Preset(hidden=1792, layers=32, intermediate=8448, heads=28, kv_heads=4, vocab=151936, tied=True),
    "7b": Preset(hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32, vocab=32000, tied=False),
}


def tensor_shapes(p: Preset) -> dict[str, tuple[int, ...]]:
    kv = p.kv_heads * p.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (p.vocab, p.hidden),
        "model.norm.weight": (p.hidden,),
    }
    for i in range(p.layers):
        q = f"model.layers.{i}"
        shapes |= {
            f"{q}.input_layernorm.weight": (p.hidden,),
            f"{q}.self_attn.q_proj.weight": (p.hidden, p.hidden),
            f"{q}.self_attn.k_proj.weight": (kv, p.hidden),
            f"{q}.self_attn.v_proj.weight": (kv, p.hidden),
            f"{q}.self_attn.o_proj.weight": (p.hidden, p.hidden),
            f"{q}.post_attention_layernorm.weight": (p.hidden,),
            f"{q}.mlp.gate_proj.weight": (p.intermediate, p.hidden),
            f"{q}.mlp.up_proj.weight": (p.intermediate, p.hidden),
            f"{q}.mlp.down_proj.weight": (p.hidden, p.intermediate),
        }
    if not p.tied:
        shapes["lm_head.weight"] = (p.vocab, p.hidden)
    return dict(sorted(shapes.items(), key=lambda kv: natural_key(kv[0])))


def parameters(p: Preset) -> int:
    return sum(math.prod(s) for s in tensor_shapes(p).values())


def hf_config(p: Preset) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p.hidden,
        "intermediate_size": p.intermediate,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "num_hidden_layers": p.layers,
        "vocab_size": p.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": p.tied,
        "torch_dtype": "bfloat16",
    }


def _gen(*key) -> torch.Generator:
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _positions(n: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """Sorted distinct positions in [0, n), each in with probability `density`: geometric gaps
    cost O(n * density) random numbers instead of n."""
    if density <= 0 or n == 0:
        return torch.empty(0, dtype=torch.int64)
    if density >= 1:
        return torch.arange(n)
    expected = n * density
    k = int(expected + 6 * math.sqrt(expected) + 16)
    gaps = torch.empty(k).geometric_(density, generator=gen).to(torch.int64)
    pos = torch.cumsum(gaps, 0) - 1
    return pos[pos < n]


def _laplace(k: int, gen: torch.Generator) -> torch.Tensor:
    mag = torch.empty(k).exponential_(1.0, generator=gen)
    sign = torch.randint(0, 2, (k,), generator=gen, dtype=torch.int8).float() * 2 - 1
    return mag * sign


@dataclass(frozen=True)
class TaskShape:
    """How one fine-tune touches the model; drawn from the family seed."""

    own_density: float  # share of weights this task alone moves
    scale: float  # update size relative to the tensor's init std
    flip: float  # probability that a shared coordinate moves against the common direction


def task_shapes(tasks: int, seed: int) -> list[TaskShape]:
    out = []
    for t in range(tasks):
        u = torch.rand(3, generator=_gen(seed, "task-shape", t)).tolist()
        out.append(TaskShape(own_density=0.04 + 0.12 * u[0], scale=0.03 + 0.05 * u[1], flip=0.2 + 0.3 * u[2]))
    return out


SHARED_DENSITY = 0.06  # coordinates every task moves (in a common direction, with per-task flips)


def _init_std(name: str, shape: tuple[int, ...]) -> float:
    return 0.02 if len(shape) == 2 else 0.0


def base_block(name: str, shape: tuple[int, ...], lo: int, hi: int, seed: int) -> torch.Tensor:
    gen = _gen(seed, "base", name, lo)
    if len(shape) == 1:  # RMSNorm scales: around 1, as trained models have them
        return (1.0 + 0.1 * torch.randn(hi - lo, generator=gen)).to(torch.bfloat16)
    return (torch.randn(hi - lo, generator=gen) * _init_std(name, shape)).to(torch.bfloat16)


@dataclass(frozen=True)
class SharedBlock:
    """Coordinates of one block that every task moves, and their common direction."""

    positions: torch.Tensor
    common: torch.Tensor


def shared_block(name: str, n: int, lo: int, seed: int) -> SharedBlock:
    positions = _positions(n, SHARED_DENSITY, _gen(seed, "shared-pos", name, lo))
    return SharedBlock(positions, _laplace(positions.numel(), _gen(seed, "shared-val", name, lo)))


def task_block(
    base: torch.Tensor,
    name: str,
    shape: tuple[int, ...],
    lo: int,
    seed: int,
    t: int,
    how: TaskShape,
    shared: SharedBlock | None = None,
) -> torch.Tensor:
    """Base block plus task t's sparse heavy-tailed update, rounded to bf16 (which drops the tiny ones)."""
    n = base.numel()
    shared = shared or shared_block(name, n, lo, seed)
    cols = shape[-1] if len(shape) == 2 else n
    rows = shape[0] if len(shape) == 2 else 1
    unit = how.scale * (_init_std(name, shape) or 0.2)
    row_scale = torch.exp(0.8 * torch.randn(rows, generator=_gen(seed, "rows", name, t))) * unit
    out = base.clone()

    pos = shared.positions
    g = _gen(seed, "task", name, lo, t)
    flips = torch.where(torch.rand(pos.numel(), generator=g) < how.flip, -1.0, 1.0)
    own_part = 0.5 + torch.rand(pos.numel(), generator=g)
    delta = shared.common * flips * own_part * row_scale[(pos + lo) // cols]
    out[pos] = (base[pos].float() + delta).to(torch.bfloat16)

    own = _positions(n, how.own_density, g)
    delta = _laplace(own.numel(), g) * row_scale[(own + lo) // cols]
    out[own] = (out[own].float() + delta).to(torch.bfloat16)
    return out


def _bf16_bytes(x: torch.Tensor) -> memoryview:
    return memoryview(x.view(torch.int16).numpy()).cast("B")


def plan_files(shapes: dict[str, tuple[int, ...]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split in natural order, as `save_pretrained(max_shard_size=...)` does."""
    files: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    return files


def generate(
    root: Path,
    preset: str | Preset = "0.5b",
    tasks: int = 8,
    seed: int = 0,
    max_shard_bytes: int = 512 * 2**20,
    quiet: bool = True,
    dense: bool = False,
) -> tuple[Path, list[tuple[str, Path]]]:
    """Write root/base and root/task_XX (HF layout with index); returns (base, [(name, path)]).

    dense: every task moves every weight (as full fine-tunes kept in float32 do), not a minority;
    only updates too small for bf16 round away. Skips the work when root/family.json says the
    same family is already there."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if not 1 <= tasks <= 99:
        raise ValueError("tasks must be between 1 and 99")
    names = [f"task_{t:02d}" for t in range(tasks)]
    dirs = [root / "base", *(root / n for n in names)]
    stamp = {"preset": p.__dict__, "tasks": tasks, "seed": seed, "max_shard_bytes": max_shard_bytes, "version": 2}
    if dense:
        stamp["dense"] = True
    done = root / "family.json"
    if done.exists() and json.loads(done.read_text()) == stamp:
        return dirs[0], list(zip(names, dirs[1:]))
    done.unlink(missing_ok=True)

    shapes = tensor_shapes(p)
    hows = task_shapes(tasks, seed)
    if dense:
        hows = [dataclasses.replace(h, own_density=1.0) for h in hows]
    files = plan_files(shapes, max_shard_bytes)
    fnames = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    t0 = time.perf_counter()
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.safetensors"):
            old.unlink()
        (d / "config.json").write_text(json.dumps(hf_config(p), indent=1))
        index = {
            "metadata": {"total_size": parameters(p) * 2},
            "weight_map": {n: f for f, group in zip(fnames, files) for n in group},
        }
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    written = 0
    for fname, group in zip(fnames, files):
        header, _ = layout_header([(n, "BF16", shapes[n]) for n in group], {"format": "pt"})
        outs = [open(d / f".{fname}.tmp", "wb") for d in dirs]
        try:
            for f in outs:
                f.write(header)
            for name in group:
                shape = shapes[name]
                numel = math.prod(shape)
                step = max(shape[-1], BLOCK // shape[-1] * shape[-1]) if len(shape) == 2 else numel
                for lo in range(0, numel, step):
                    hi = min(numel, lo + step)
                    base = base_block(name, shape, lo, hi, seed)
                    outs[0].write(_bf16_bytes(base))
                    shared = shared_block(name, hi - lo, lo, seed)
                    for t, how in enumerate(hows):
                        outs[t + 1].write(_bf16_bytes(task_block(base, name, shape, lo, seed, t, how, shared)))
                written += numel * 2 * len(dirs)
            if not quiet:
                print(f"  {fname}: {written / 1e9:.2f} GB written, {time.perf_counter() - t0:.0f}s", flush=True)
        finally:
            for f in outs:
                f.close()
        for d in dirs:
            os.replace(d / f".{fname}.tmp", d / fname)
    done.write_text(json.dumps(stamp))
    return dirs[0], list(zip(names, dirs[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="0.5b")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-mb", type=int, default=512)
    ap.add_argument("--dense", action="store_true", help="every task moves every weight (full fine-tunes)")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    print(
        f"{args.preset}: {parameters(p) / 1e9:.3f}B parameters, {args.tasks} tasks, "
        f"{parameters(p) * 2 * (args.tasks + 1) / 1e9:.2f} GB to write",
        flush=True,
    )
    t0 = time.perf_counter()
    generate(
        Path(args.dir), args.preset, args.tasks, args.seed, args.max_shard_mb * 2**20, quiet=False, dense=args.dense
    )
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
