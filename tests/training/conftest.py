import pytest

from tests.tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("moe") / "model", seed=0, moe=True)


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("dense") / "model", seed=1, moe=False)
