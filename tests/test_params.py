import pytest

from qbench.params import Param, QBenchError, parse_specs, validate_params


def test_parse_three_methods_with_parameters():
    specs = parse_specs("fp16,nf4:blocksize=128,double_quant=false,gptq:bits=3")
    assert [s.name for s in specs] == ["fp16", "nf4", "gptq"]
    assert specs[1].params == {"blocksize": "128", "double_quant": "false"}
    assert specs[2].params == {"bits": "3"}


def test_repeated_options_concatenate():
    specs = parse_specs(["memory", "perplexity:seqlen=512"])
    assert [str(s) for s in specs] == ["memory", "perplexity:seqlen=512"]


def test_parameter_without_name_is_an_error():
    with pytest.raises(QBenchError, match="no name before it"):
        parse_specs("bits=3")


def test_duplicate_parameter_is_an_error():
    with pytest.raises(QBenchError, match="given twice"):
        parse_specs("nf4:blocksize=64,blocksize=128")


DECLARED = {
    "bits": Param(int, 4, choices=[2, 3, 4, 8]),
    "double_quant": Param(bool, True),
    "ratio": Param(float, 0.5, check=lambda v: None if 0 < v < 1 else "must be in (0, 1)"),
}


def test_validation_converts_types_and_fills_defaults():
    values = validate_params("m", DECLARED, {"bits": "3", "double_quant": "false"})
    assert values == {"bits": 3, "double_quant": False, "ratio": 0.5}


@pytest.mark.parametrize("given, message", [
    ({"bits": "5"}, "valid values: 2, 3, 4, 8"),
    ({"bits": "four"}, "must be int"),
    ({"double_quant": "maybe"}, "true or false"),
    ({"ratio": "2"}, "must be in"),
    ({"colour": "red"}, "unknown parameter 'colour'; valid parameters: bits, double_quant, ratio"),
])
def test_bad_values_get_one_clear_line(given, message):
    with pytest.raises(QBenchError, match=message) as info:
        validate_params("method m", DECLARED, given)
    assert "\n" not in str(info.value)
