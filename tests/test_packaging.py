"""One import namespace: the repository's folders install as mergeflow.workers, mergeflow.workflows,
mergeflow.infra and mergeflow.dev, and nothing else lands at the top level of site-packages."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    dirs = doc["tool"]["setuptools"]["package-dir"]
    listed = set(doc["tool"]["setuptools"]["packages"])
    found = set()
    for name, folder in dirs.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == listed


def test_a_real_install_puts_only_mergeflow_at_the_top_level(tmp_path):
    target = tmp_path / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    top = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert top == {"mergeflow"} | ({"bin"} if (target / "bin").exists() else set()), top
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    probe = (
        "import mergeflow, mergeflow.workers.shard, mergeflow.workflows.merge, mergeflow.infra.storage.s3, "
        "mergeflow.dev.synthetic\n"
        "for name in ('workers', 'workflows', 'infra', 'dev'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    raise SystemExit(f'{name} is importable at the top level')\n"
        "print(mergeflow.workers.shard.__file__)"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().startswith(str(target / "mergeflow" / "workers"))
