import pytest

from ..tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_moe_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("engine") / "moe")


@pytest.fixture(scope="session")
def tiny_dense_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("engine") / "dense", moe=False)
