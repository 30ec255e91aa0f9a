import pytest


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    """One cache for the real CIFAR-10 copy, so it is decoded once per test session."""
    return tmp_path_factory.mktemp("real-cache")
