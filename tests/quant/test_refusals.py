"""Invalid settings are refused before any work, with a message saying why (API and CLI)."""

import pytest

from ernie45.cli.main import main
from ernie45.quant import quantize
from ernie45.quant.calibration import read_calibration_texts
from ernie45.quant.spec import QuantSpec


@pytest.mark.parametrize("bits", [3, 16, 1])
def test_bits_outside_8_4_2(tiny_moe, tmp_path, bits):
    with pytest.raises(ValueError, match=r"bits must be one of 8, 4, 2"):
        quantize(tiny_moe, tmp_path / "out", bits=bits)
    assert not (tmp_path / "out").exists()


def test_group_size_not_dividing_an_input_dim(tiny_moe, tmp_path):
    # The experts' down projection has 16 inputs.
    with pytest.raises(ValueError, match=r"group size 32 does not divide its input dim 16"):
        quantize(tiny_moe, tmp_path / "out", bits=4, group_size=32)
    assert not (tmp_path / "out").exists()


def test_group_size_not_a_multiple_of_16():
    with pytest.raises(ValueError, match=r"multiple of 16"):
        QuantSpec(4, 24)


def test_missing_calibration_file(tiny_moe, tmp_path):
    with pytest.raises(ValueError, match=r"cannot read calibration file .*nope\.jsonl"):
        quantize(tiny_moe, tmp_path / "out", bits=4, method="gptq", calib=tmp_path / "nope.jsonl")


def test_binary_calibration_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_bytes(b"\xff\xfe\x00\x80 not utf-8")
    with pytest.raises(ValueError, match=r"cannot read calibration file"):
        read_calibration_texts(path)


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "fine"}\n{"text": unquoted}\n')
    with pytest.raises(ValueError, match=r"line 2: not a JSON string or an object with 'text'"):
        read_calibration_texts(path)


def test_empty_calibration_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n  \n")
    with pytest.raises(ValueError, match=r"contains no text"):
        read_calibration_texts(path)


def test_calibrated_method_without_data(tiny_moe, tmp_path):
    with pytest.raises(ValueError, match=r"gptq needs calibration data"):
        quantize(tiny_moe, tmp_path / "out", bits=4, group_size=16, method="gptq")


def test_unknown_method_and_recipe(tiny_moe, tmp_path):
    with pytest.raises(ValueError, match=r"method 'awq' is not one of"):
        quantize(tiny_moe, tmp_path / "out", bits=4, method="awq")
    with pytest.raises(ValueError, match=r"recipe 'mixed-1bit' is not one of"):
        quantize(tiny_moe, tmp_path / "out", bits=2, recipe="mixed-1bit")


def test_requantizing_a_quantized_checkpoint(tiny_moe, tmp_path):
    quantize(tiny_moe, tmp_path / "q", bits=8)
    with pytest.raises(ValueError, match=r"already quantized"):
        quantize(tmp_path / "q", tmp_path / "q2", bits=4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bits", "3"], "bits must be one of 8, 4, 2"),
        (["--bits", "4", "--group-size", "32"], "group size 32 does not divide its input dim 16"),
        (["--bits", "4", "--method", "gptq", "--calib", "/nonexistent/calib.txt"], "cannot read calibration file"),
    ],
)
def test_cli_refusals(tiny_moe, tmp_path, capsys, extra, message):
    assert main(["quantize", str(tiny_moe), "--out", str(tmp_path / "out"), *extra]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
