import pytest
import torch

from ..tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_moe_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("parallel") / "moe")


@pytest.fixture(scope="session")
def tiny_dense_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("parallel") / "dense", moe=False)


@pytest.fixture
def one_thread():
    """Rank 0 on one thread while the workers run (each on one): 2 ranks on 2 cores without contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
