import pytest

from bench.data import load_dataset


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    """One cache for the real CIFAR-10 copy, so it is decoded once per test session."""
    return tmp_path_factory.mktemp("real-cache")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A 4-class synthetic dataset small enough to train a smoke model on in seconds."""
    return load_dataset("synthetic", None, tmp_path_factory.mktemp("cache"),
                        synthetic={"classes": 4, "size": 32, "train_per_class": 40, "test_per_class": 10, "seed": 0})
