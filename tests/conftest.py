import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _corpus_cache(tmp_path_factory):
    """Built-in corpus cache in a per-session temp dir, unless the caller chose one (MOELAB_CACHE)."""
    if "MOELAB_CACHE" not in os.environ:
        os.environ["MOELAB_CACHE"] = str(tmp_path_factory.mktemp("moelab_cache"))
    yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
