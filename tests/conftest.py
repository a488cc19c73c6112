"""Shared test settings: never reach a model hub, keep torch on few threads, deterministic seeds."""

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A tiny synthetic demo corpus in the Libri2Mix layout, shared by the data tests (never modified:
    tests that break it work on ``corpus_copy``)."""
    from umamba.data.demo_corpus import make_demo_corpus

    root = tmp_path_factory.mktemp("corpus")
    make_demo_corpus(str(root), n_train=3, n_valid=2, n_test=2, seconds=1.0, voices="synthetic")
    return root


@pytest.fixture
def corpus_copy(corpus, tmp_path):
    """A private copy of :func:`corpus` that a test may break."""
    shutil.copytree(corpus, tmp_path / "data")
    return tmp_path / "data"
