"""PEFT LoRA adapters as tasks, mixed with full fine-tunes, through every seed method: the sharded
path (B @ A formed chunk by chunk of rows in the workers) equals an independent reference that
builds each adapter's dense task vector with numpy (float64 B @ A, scaled, rounded to float32)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import reference_impl as ref
import torch
from conftest import config_for, reference_args
from safetensors.torch import load_file, save_file

from mergeflow.dev.suite.models import LOT_MODEL
from mergeflow.errors import CheckpointError
from mergeflow.workflows.merge import run_merge
from mergeflow.workflows.plan import make_plan

PEFT = "base_model.model."


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= load_file(f)
    return out


def write_adapter(
    folder: Path,
    base: dict,
    targets: dict[str, int],
    *,
    seed: int,
    alpha: float = 8.0,
    full: tuple[str, ...] = (),
    **cfg,
) -> Path:
    """A LoRA adapter as PEFT saves one: lora_A (r, in) / lora_B (out, r) per targeted module, full
    tensors for modules_to_save, adapter_config.json."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, r in targets.items():
        w = base[f"{module}.weight"]
        out, inp = (w.shape[1], w.shape[0]) if cfg.get("fan_in_fan_out") else tuple(w.shape)
        tensors[f"{PEFT}{module}.lora_A.weight"] = torch.randn(r, inp, generator=gen) * 0.3
        tensors[f"{PEFT}{module}.lora_B.weight"] = torch.randn(out, r, generator=gen) * 0.3
    for name in full:
        tensors[f"{PEFT}{name}"] = (base[name].float() + 0.05 * torch.randn(base[name].shape, generator=gen)).to(
            base[name].dtype
        )
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    r = max(targets.values())
    doc = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in targets}),
        "modules_to_save": [n.rsplit(".", 1)[0] for n in full],
        "use_dora": False,
    } | cfg
    (folder / "adapter_config.json").write_text(json.dumps(doc))
    return folder


def dense_task_vectors(base: dict, folder: Path) -> dict[str, torch.Tensor]:
    """The reference: each adapter's task vector with numpy, every base float tensor."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    t = {k[len(PEFT) :]: v for k, v in load_file(folder / "adapter_model.safetensors").items()}
    out = {}
    for name in ref.float_names(base):
        module = name.removesuffix(".weight")
        if f"{module}.lora_A.weight" in t:
            a, b = t[f"{module}.lora_A.weight"].double().numpy(), t[f"{module}.lora_B.weight"].double().numpy()
            short = module.rsplit(".", 1)[-1]
            r = cfg.get("rank_pattern", {}).get(short, cfg["r"])
            alpha = cfg.get("alpha_pattern", {}).get(short, cfg["lora_alpha"])
            scale = alpha / (np.sqrt(r) if cfg.get("use_rslora") else r)
            delta = (b @ a) * scale
            out[name] = torch.from_numpy((delta.T if cfg.get("fan_in_fan_out") else delta).astype(np.float32))
        elif name in t:
            out[name] = t[name].float() - base[name].float()
        else:
            out[name] = torch.zeros(base[name].shape)
    return out


@pytest.fixture
def mixed(family, tmp_path):
    """A full fine-tune and two adapters (rank and alpha patterns; rsLoRA, fan_in_fan_out on a square
    weight, a module to save) on one base."""

    def make(dtype):
        base_dir, tasks = family(tasks=1, layers=2, hidden=16, vocab=32, dtype=dtype, shards=2)
        base = load_dir(base_dir)
        a1 = write_adapter(
            tmp_path / "lora1",
            base,
            {
                "model.layers.0.self_attn.q_proj": 4,
                "model.layers.1.self_attn.v_proj": 2,
                "model.layers.1.mlp.up_proj": 4,
            },
            seed=1,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"v_proj": 3.0},
        )
        a2 = write_adapter(
            tmp_path / "lora2",
            base,
            {"model.layers.0.self_attn.o_proj": 3, "model.layers.1.self_attn.q_proj": 3},
            seed=2,
            alpha=6.0,
            use_rslora=True,
            fan_in_fan_out=True,
            full=("lm_head.weight",),
        )
        return base_dir, base, [tasks[0], ("lora1", a1), ("lora2", a2)]

    return make


METHODS = [
    {"name": "task_arithmetic", "alpha": 0.4},
    {"name": "ties", "density": 0.3},
    {"name": "tall_masks", "lambda": 0.5},
    {"name": "consensus", "k": 2, "base_merge": "ties", "density": 0.4},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "layout", [{"shard_size": 3000, "chunk_elems": 24}, {"shard_size": "1GB"}], ids=["many-shards", "one-shard"]
)
def test_adapters_and_full_checkpoints_mixed_equal_the_dense_reference(
    ray_session, mixed, tmp_path, monkeypatch, dtype, layout
):
    base_dir, base, tasks = mixed(dtype)
    taus = [ref.task_vectors(base, [load_dir(tasks[0][1])])[0]] + [dense_task_vectors(base, d) for _, d in tasks[1:]]
    monkeypatch.setattr(ref, "task_vectors", lambda b, t: taus)
    for i, method in enumerate(METHODS):
        cfg = config_for(base_dir, tasks, tmp_path / f"run{i}", method, **layout)
        report = run_merge(cfg, quiet=True)
        if layout.get("chunk_elems"):
            assert len(report.plan.shards) > 2  # chunks cut rows: B @ A is formed over partial row ranges
        want = ref.merge(base, [], method["name"], **reference_args(cfg))["model"]
        got = load_dir(tmp_path / f"run{i}" / "model")
        for name in want:
            assert torch.equal(got[name], want[name]), f"{method['name']} {name}"


def test_adapter_inputs_are_recorded_and_hashed_with_their_config(ray_session, mixed, tmp_path):
    base_dir, _, tasks = mixed(torch.float32)
    report = run_merge(config_for(base_dir, tasks, tmp_path / "run", {"name": "task_arithmetic"}), quiet=True)
    files = report.manifest["inputs"]["tasks"][1]["files"]
    assert set(files) == {"adapter_model.safetensors", "adapter_config.json"}
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert (
        card.startswith("---\nbase_model:")
        and "kind: lora" in card
        and files["adapter_config.json"]["sha256"] not in card
    )  # the card lists each input's checkpoint digest, not file by file


def test_bad_adapters_fail_at_plan_time_in_one_line(family, tmp_path):
    base_dir, tasks = family(tasks=1)
    base = load_dir(base_dir)

    def plan_with(folder):
        return make_plan(
            config_for(base_dir, [tasks[0], ("ad", folder)], tmp_path / "out", {"name": "task_arithmetic"})
        )

    renamed = {
        k.replace("layers.0", "layers.9"): v
        for k, v in load_file(
            write_adapter(tmp_path / "src", base, {"model.layers.0.self_attn.q_proj": 2}, seed=0)
            / "adapter_model.safetensors"
        ).items()
    }
    nine = tmp_path / "nine"
    nine.mkdir()
    save_file(renamed, nine / "adapter_model.safetensors")
    (nine / "adapter_config.json").write_text((tmp_path / "src" / "adapter_config.json").read_text())
    with pytest.raises(
        CheckpointError,
        match=r"task 'ad'.*targets 'model.layers.9.self_attn.q_proj' but the base "
        r"has no tensor",
    ):
        plan_with(nine)
    dora = write_adapter(tmp_path / "dora", base, {"model.layers.0.self_attn.q_proj": 2}, seed=0, use_dora=True)
    with pytest.raises(CheckpointError, match=r"DoRA \(use_dora\) adapters are not supported"):
        plan_with(dora)
    wrong_r = write_adapter(
        tmp_path / "r", base, {"model.layers.0.self_attn.q_proj": 2}, seed=0, rank_pattern={"q_proj": 4}
    )
    with pytest.raises(CheckpointError, match=r"not a rank-4 pair"):
        plan_with(wrong_r)
    other = write_adapter(tmp_path / "ia3", base, {"model.layers.0.self_attn.q_proj": 2}, seed=0, peft_type="IA3")
    with pytest.raises(CheckpointError, match=r"PEFT type 'IA3' is not supported"):
        plan_with(other)
    with pytest.raises(CheckpointError, match=r"base: .* is a PEFT adapter"):
        make_plan(config_for(tmp_path / "src", tasks, tmp_path / "o2", {"name": "task_arithmetic"}))


@pytest.mark.parametrize("name", ["lot", "regmean"])
def test_feature_methods_refuse_adapter_tasks_in_one_line(ray_session, mixed, tmp_path, name):
    base_dir, _, tasks = mixed(torch.float32)
    cfg = config_for(base_dir, tasks, tmp_path / "run", {"name": name, "model": LOT_MODEL})
    with pytest.raises(CheckpointError, match=rf"task 'lora1': .*is a LoRA adapter; {name} runs each task's full"):
        run_merge(cfg, quiet=True)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_concat_adapter_is_task_arithmetic_over_the_adapters(ray_session, mixed, tmp_path):
    """Two adapters (one in GPT-2's fan_in_fan_out layout, rsLoRA) joined: per module the ranks add
    up and base + B @ A is the float64 Task Arithmetic merge of the adapters' task vectors."""
    from mergeflow.workflows.config import config_from_dict

    base_dir, base, tasks = mixed(torch.float32)
    adapters = tasks[1:]
    raw = {
        "base": str(base_dir),
        "tasks": [{"name": n, "checkpoint": str(p)} for n, p in adapters],
        "output": {"path": str(tmp_path / "run"), "format": "lora", "concat": True},
        "method": {"name": "task_arithmetic", "alpha": 0.4},
    }
    report = run_merge(config_from_dict(raw), quiet=True)
    out = tmp_path / "run" / "lora"
    lora = load_file(out / "adapter_model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    taus = [dense_task_vectors(base, d) for _, d in adapters]
    model = load_dir(tmp_path / "run" / "model")
    assert report.manifest["lora"]["ranks"] == {  # each module's own rank (the MiniLM test joins two)
        "model.layers.0.self_attn.q_proj": 4,
        "model.layers.0.self_attn.o_proj": 3,
        "model.layers.1.self_attn.q_proj": 3,
        "model.layers.1.self_attn.v_proj": 2,
        "model.layers.1.mlp.up_proj": 4,
    }
    assert config["modules_to_save"] == ["lm_head"]  # lora2 trains it whole
    for module, k in report.manifest["lora"]["ranks"].items():
        a = lora[f"base_model.model.{module}.lora_A.weight"].double()
        b = lora[f"base_model.model.{module}.lora_B.weight"].double()
        assert a.shape[0] == k and b.shape[1] == k
        scaling = config["alpha_pattern"].get(module.replace(".", "\\."), config["lora_alpha"]) / config[
            "rank_pattern"
        ].get(module.replace(".", "\\."), config["r"])
        assert scaling == 1.0
        name = f"{module}.weight"
        want = 0.4 * sum(t[name].double() for t in taus)
        torch.testing.assert_close(b @ a, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(base[name].double() + b @ a, model[name].double(), rtol=0, atol=1e-6)
    assert torch.equal(lora["base_model.model.lm_head.weight"], model["lm_head.weight"])


@pytest.mark.parametrize(
    "case,needle",
    [
        ("ties", "the concatenated adapter is exact only for a scaled sum of task vectors (task_arithmetic), not ties"),
        ("full", "task 'full' ("),
    ],
)
def test_concat_refuses_what_it_cannot_write_exactly(mixed, tmp_path, case, needle):
    from mergeflow.errors import ConfigError
    from mergeflow.workflows.config import config_from_dict

    base_dir, _, tasks = mixed(torch.float32)
    chosen = tasks[1:] if case == "ties" else [("full", tasks[0][1]), *tasks[1:]]
    raw = {
        "base": str(base_dir),
        "tasks": [{"name": n, "checkpoint": str(p)} for n, p in chosen],
        "output": {"path": str(tmp_path / "run"), "format": "lora", "concat": True},
        "method": {"name": "ties" if case == "ties" else "task_arithmetic"},
    }
    with pytest.raises(ConfigError) as err:
        run_merge(config_from_dict(raw), quiet=True)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


NEEDS_TASK_MODELS = {"lot", "regmean"}  # they refuse adapters (test above)


def test_every_method_merges_adapters_as_the_reference_dense_task_vectors(ray_session, mixed, tmp_path):
    """Every method, adapters in vs checkpoints holding the numpy reference's dense task vectors: on
    a zero base theta_t = tau_t exactly in float32, so the two merges must agree to the last byte."""
    import shutil

    from mergeflow.workers.methods import methods

    base_dir, base, tasks = mixed(torch.float32)
    zero = {n: torch.zeros_like(t) if t.is_floating_point() else t for n, t in base.items()}
    zero_dir = tmp_path / "zero"
    zero_dir.mkdir()
    save_file(zero, zero_dir / "model.safetensors")
    shutil.copy(base_dir / "config.json", zero_dir / "config.json")
    adapters = tasks[1:]
    dense = []
    for name, folder in adapters:
        taus = dense_task_vectors(zero, folder)
        d = tmp_path / f"dense-{name}"
        d.mkdir()
        save_file({n: taus.get(n, t).contiguous() for n, t in zero.items()}, d / "model.safetensors")
        shutil.copy(base_dir / "config.json", d / "config.json")
        dense.append((name, d))
    names = sorted(set(methods()) - NEEDS_TASK_MODELS)
    assert {"dare_ties", "breadcrumbs", "della", "emr", "tsv_merge", "iso_cts", "tall_masks"} <= set(names)
    for name in names:
        got = {}
        for kind, inputs in (("adapters", adapters), ("dense", dense)):
            out = tmp_path / name / kind
            report = run_merge(config_for(zero_dir, inputs, out, {"name": name}, shard_size=3000), quiet=True)
            got[kind] = {
                rel: e["sha256"]
                for rel, e in report.manifest["outputs"].items()
                if rel.endswith(".safetensors") or rel.startswith("compressed/")
            }
        assert got["adapters"] == got["dense"], name
        merged = load_dir(tmp_path / name / "adapters" / "model")
        assert all(bool(torch.isfinite(t).all()) for t in merged.values() if t.is_floating_point()), name
