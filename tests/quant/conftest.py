import pytest

from ..tiny_checkpoint import make_tiny_checkpoint

CALIBRATION_TEXT = "\n\n".join(
    f"Paragraph {i}: the model reads a sentence about {topic}, counts to {i}, and writes a short answer."
    for i, topic in enumerate(["rivers", "numbers", "cats", "engines", "weather", "music", "trees", "ships"] * 4)
)


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory):
    """Tiny MoE checkpoint: hidden 32, expert width 16 (so group sizes must divide 16), 4 experts, top-2."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("quant") / "moe", seed=1)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIBRATION_TEXT, encoding="utf-8")
    return path
