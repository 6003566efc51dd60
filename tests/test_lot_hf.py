"""LOT's `hf` model source on a tiny BERT built offline from its config.json: random base weights
and perturbed "fine-tunes" written by the test, token-id exemplar files per task (padded batches),
statistics checked against a direct computation, and the merged checkpoint loads in transformers."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import config_for
from safetensors.torch import load_file, save_file

from mergeflow.errors import ConfigError
from mergeflow.infra.storage import sha256_of
from mergeflow.workers.checkpoint import open_checkpoint
from mergeflow.workers.methods.lot import solve
from mergeflow.workers.methods.lot.features import ENERGY, GRAM, ROWS, FeatureJob, load_stats, task_features
from mergeflow.workers.methods.lot.models import TaskModelSpec
from mergeflow.workers.shard import merge_shard
from mergeflow.workflows.plan import make_plan


def lot_shard(spec, stats):
    """LOT's merge of one shard from these statistics files (what the map runs after the feature stage)."""
    return merge_shard(spec.with_globals(lot_stats=tuple(stats)))


CONFIG = {
    "model_type": "bert",
    "architectures": ["BertModel"],
    "vocab_size": 50,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 24,
    "max_position_embeddings": 32,
    "pad_token_id": 0,
}
QUERY = "encoder.layer.0.attention.self.query.weight"
LENGTHS = [5, 9, 3, 7, 6, 4]


def bert(config: dict) -> transformers.BertModel:
    cfg = dict(config)
    return transformers.BertModel(transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    base = {k: v.contiguous() for k, v in bert(CONFIG).state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    tasks = []
    for i, name in enumerate(["a", "b"]):
        sd = {
            k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in base.items()
        }
        tasks.append((name, root / name, sd))
        ids = [[int(x) for x in torch.randint(1, 50, (n,), generator=gen)] for n in LENGTHS]
        doc = ids if i == 0 else {"input_ids": ids}  # both accepted file layouts
        (root / f"{name}.json").write_text(json.dumps(doc))
    for d, sd in [(root / "base", base), *[(p, sd) for _, p, sd in tasks]]:
        d.mkdir()
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(CONFIG))
    return root, [(n, p) for n, p, _ in tasks]


def job(root, name, path, exemplars=4, exemplar_file=None, cache="cache"):
    cp = open_checkpoint(str(path))
    spec = TaskModelSpec("hf", cp.uri, name, exemplars, 0, exemplar_file or str(root / f"{name}.json"))
    return FeatureJob(spec, tuple(cp.tensors), str(root / cache)), [sha256_of(f) for f in cp.files]


def features(root, name, path):
    j, hashes = job(root, name, path)
    return task_features(j, *hashes)


def test_statistics_of_a_padded_bert_batch(family):
    root, tasks = family
    stats = load_stats(features(root, *tasks[0]).uri)
    chosen = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(0))[:4].sort().values
    tokens = sum(LENGTHS[i] for i in chosen)  # padded positions are left out
    assert stats[ROWS + "encoder.layer.0.attention.self.query.bias"].item() == tokens
    assert stats[ROWS + "embeddings.LayerNorm.bias"].item() == tokens
    assert stats[GRAM + QUERY].shape == (16, 16) and stats[GRAM + QUERY].dtype == torch.float64
    assert stats[GRAM + "encoder.layer.1.intermediate.dense.weight"].shape == (16, 16)
    assert stats[GRAM + "encoder.layer.1.output.dense.weight"].shape == (24, 24)
    assert not any("embeddings.word_embeddings" in k for k in stats)  # embeddings take the mean
    # LayerNorm's x_hat has unit variance per row: its channel energies sum to rows x width (eps aside)
    energy = stats[ENERGY + "encoder.layer.0.attention.output.LayerNorm.weight"]
    assert energy.sum().item() == pytest.approx(tokens * 16, rel=1e-3)

    # the first query layer's input is the embeddings' output: its Gram, computed directly
    model = bert(CONFIG)
    model.load_state_dict(load_file(str(tasks[0][1] / "model.safetensors")))
    ids = json.loads((root / "a.json").read_text())
    rows = []
    with torch.no_grad():
        for i in chosen.tolist():
            rows.append(model.eval().embeddings(input_ids=torch.tensor([ids[i]]))[0].double())
    x = torch.cat(rows)
    torch.testing.assert_close(stats[GRAM + QUERY], x.T @ x, rtol=1e-5, atol=1e-6)


def test_lot_merge_of_bert_loads_and_beats_task_arithmetic_on_drift(family, tmp_path):
    root, tasks = family
    results = [features(root, n, p) for n, p in tasks]
    files = [str(root / f"{n}.json") for n, _ in tasks]
    plan = make_plan(
        config_for(
            root / "base",
            tasks,
            tmp_path / "run",
            {"name": "lot", "model": "hf", "exemplars": 4, "exemplar_files": dict(zip([n for n, _ in tasks], files))},
        )
    )
    assert list(plan.params.exemplar_files.values()) == files
    out = lot_shard(plan.shards[0], tuple(r.uri for r in results))
    assert list(out.outputs) == ["model/model-00001-of-00001.safetensors"]
    merged = load_file(str(tmp_path / "run" / "model" / "model-00001-of-00001.safetensors"))
    model = bert(CONFIG)
    model.load_state_dict(merged)  # strict: every name, shape and dtype of the base

    base = load_file(str(root / "base" / "model.safetensors"))
    fts = [load_file(str(p / "model.safetensors")) for _, p in tasks]
    grams = [load_stats(r.uri)[GRAM + QUERY] for r in results]
    expected = base[QUERY] + solve.linear_delta([f[QUERY] - base[QUERY] for f in fts], grams).float()
    torch.testing.assert_close(merged[QUERY], expected, rtol=0, atol=1e-6)
    emb = "embeddings.word_embeddings.weight"
    torch.testing.assert_close(merged[emb], base[emb] + sum(f[emb] - base[emb] for f in fts) / 2, rtol=0, atol=1e-6)
    ta = base[QUERY] + 0.3 * sum(f[QUERY] - base[QUERY] for f in fts)
    ft = [f[QUERY] for f in fts]
    assert solve.feature_drift(merged[QUERY], ft, grams) < solve.feature_drift(ta, ft, grams)


def test_bad_exemplar_files_fail_in_one_line(family, tmp_path):
    root, tasks = family
    name, path = tasks[0]
    (tmp_path / "big.json").write_text(json.dumps([[1, 2, 500]]))
    (tmp_path / "flat.json").write_text(json.dumps([1, 2, 3]))
    cases = {
        str(tmp_path / "missing.json"): "not found",
        str(tmp_path / "big.json"): "token id 500",
        str(tmp_path / "flat.json"): "list of token-id lists",
    }
    for file, words in cases.items():
        j, hashes = job(root, name, path, exemplar_file=file, cache=str(tmp_path / "c"))
        with pytest.raises(ConfigError) as err:
            task_features(j, *hashes)
        msg = str(err.value)
        assert words in msg and "method.exemplar_files.a" in msg and "\n" not in msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_features_and_solve_match_cpu(family, tmp_path):
    """The GPU path (features and solve on CUDA) against the CPU path: same statistics and model up to
    float rounding (GEMM and eigen-solver kernels differ, so not bit for bit)."""
    import dataclasses

    root, tasks = family
    cpu, gpu = [], []
    for n, p in tasks:
        j, hashes = job(root, n, p, cache=str(tmp_path / "cpu"))
        cpu.append(task_features(j, *hashes))
        gpu.append(task_features(dataclasses.replace(j, cache=str(tmp_path / "gpu"), device="cuda"), *hashes))
    for a, b in zip(cpu, gpu):
        sa, sb = load_stats(a.uri), load_stats(b.uri)
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-4)
    files = {n: str(root / f"{n}.json") for n, _ in tasks}
    plan = make_plan(
        config_for(
            root / "base",
            tasks,
            tmp_path / "run-cpu",
            {"name": "lot", "model": "hf", "exemplars": 4, "exemplar_files": files},
        )
    )
    lot_shard(plan.shards[0], tuple(r.uri for r in cpu))
    lot_shard(
        dataclasses.replace(plan.shards[0], device="cuda", output=str(tmp_path / "run-gpu")), tuple(r.uri for r in cpu)
    )
    part = "model/model-00001-of-00001.safetensors"
    a, b = load_file(str(tmp_path / "run-cpu" / part)), load_file(str(tmp_path / "run-gpu" / part))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
