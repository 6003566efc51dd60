"""Generate a family of checkpoints (a base and T fine-tunes) that look like the real
thing: Llama-style tensor names, an int64 buffer, sparse heavy-tailed task vectors
that overlap partly. Used by the demo, the tests and the benchmarks; deterministic by seed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def base_tensors(
    layers: int, hidden: int, vocab: int, gen: torch.Generator, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    def w(*shape):
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(dtype)

    sd = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=dtype)}
    for i in range(layers):
        p = f"model.layers.{i}"
        sd |= {
            f"{p}.input_layernorm.weight": torch.ones(hidden, dtype=dtype),
            f"{p}.self_attn.q_proj.weight": w(hidden, hidden),
            f"{p}.self_attn.k_proj.weight": w(hidden // 2, hidden),
            f"{p}.self_attn.v_proj.weight": w(hidden // 2, hidden),
            f"{p}.self_attn.o_proj.weight": w(hidden, hidden),
            f"{p}.post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
            f"{p}.mlp.gate_proj.weight": w(2 * hidden, hidden),
            f"{p}.mlp.up_proj.weight": w(2 * hidden, hidden),
            f"{p}.mlp.down_proj.weight": w(hidden, 2 * hidden),
        }
    sd["lm_head.weight"] = w(vocab, hidden)
    sd["model.rotary_emb.position_ids"] = torch.arange(64, dtype=torch.int64)
    return sd


def task_vector_like(t: torch.Tensor, gen: torch.Generator, shared: torch.Tensor, scale: float) -> torch.Tensor:
    """Sparse Laplace-tailed update plus a component shared by all tasks (they overlap)."""
    n = t.numel()
    keep = torch.rand(n, generator=gen) < 0.3
    lap = _laplace(n, gen)
    own = torch.where(keep, lap, torch.zeros(n)) * scale
    return (own + 0.5 * scale * shared[:n]).view(t.shape)


def _laplace(n: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=gen) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.4999999))


def write_checkpoint(sd: dict[str, torch.Tensor], out: Path, shards: int, config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(sd)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    if shards <= 1:
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: sd[n].contiguous() for n in part}, out / fname, metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
        "weight_map": weight_map,
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def make_family(
    root: Path,
    tasks: int = 4,
    layers: int = 4,
    hidden: int = 64,
    vocab: int = 256,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 1,
    seed: int = 0,
    scale: float = 0.01,
) -> tuple[Path, list[tuple[str, Path]]]:
    """Write base/ and task_XX/ under root; returns (base path, [(task name, path)])."""
    gen = torch.Generator().manual_seed(seed)
    base = base_tensors(layers, hidden, vocab, gen, dtype)
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    write_checkpoint(base, root / "base", shards, config)
    largest = max(t.numel() for t in base.values())
    shared = _laplace(largest, gen)
    out = []
    for k in range(tasks):
        name = f"task_{k:02d}"
        sd = {}
        for n, t in base.items():
            if t.is_floating_point():
                sd[n] = (t.float() + task_vector_like(t, gen, shared, scale)).to(dtype)
            else:
                sd[n] = t.clone()
        write_checkpoint(sd, root / name, shards, config)
        out.append((name, root / name))
    return root / "base", out
