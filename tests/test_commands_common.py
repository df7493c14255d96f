"""The helpers several commands share: one parser for strength factors, one spelling of "no activation"."""

import pytest

from hnkit.errors import HnkitError


def test_strength_factors_are_parsed_alike_for_every_option():
    from hnkit.commands.common import parse_factors

    assert parse_factors(" 0, 0.5 ,1e0,-2") == [0.0, 0.5, 1.0, -2.0]
    for option in ("--strengths", "--grid"):
        for text, words in (("0,x", "bad strength 'x', expected comma-separated numbers"),
                            ("0,nan", "bad strength 'nan', expected a finite number"),
                            ("0,,1", "expected comma-separated numbers"), ("0,1,", "expected comma-separated"),
                            ("", "expected comma-separated")):
            with pytest.raises(HnkitError, match=f"^{option} {text!r}: .*{words}") as info:
                parse_factors(text, option)
            assert "\n" not in str(info.value)


def test_no_activation_has_one_spelling():
    from hnkit.commands.options import module_config
    from hnkit.module import activation_name, is_linear_activation

    assert activation_name(None) is None and activation_name("linear") is None
    assert activation_name("relu") == "relu" and activation_name("Linear") == "Linear"  # names are exact
    assert is_linear_activation("linear") and not is_linear_activation("relu")
    opts = {"layer_structure": [1, 2, 1], "activation": "linear", "layer_norm": False, "dropout_structure": None,
            "activate_output": False, "weight_init": "Normal", "zero_init_last": False, "per_site": False}
    assert module_config(opts).activation is None
