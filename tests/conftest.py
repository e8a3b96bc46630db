"""Shared fixtures: a small real-text corpus and an isolated data cache."""

import os
import shutil
import sysconfig
from pathlib import Path

import pytest

# Triton kernels run on CPU tensors in Triton's interpreter: the variable must be set before triton is imported.
# On a machine with a GPU (TRITON_INTERPRET unset) the same kernel tests run on CUDA tensors instead.
if os.environ.get("HIER_LM_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A few real standard-library modules: about 150 KB of Python text.
CORPUS_MODULES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py", "calendar.py")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where the kernel tests run on a GPU (HIER_LM_TEST_DEVICE=cuda)."""
    if os.environ.get("HIER_LM_TEST_DEVICE", "cpu") == "cuda":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run with HIER_LM_TEST_DEVICE=cuda")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_data_cache(tmp_path_factory, monkeypatch):
    """No test writes to the repository's data/ folder or to the user's W&B settings."""
    monkeypatch.setenv("HIER_LM_DATA", str(tmp_path_factory.getbasetemp() / "data-cache"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in CORPUS_MODULES:
        shutil.copy(stdlib / name, folder / name)
    return folder
