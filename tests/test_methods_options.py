"""Unknown options of every registered method give one error that names them and lists the config's fields."""

from __future__ import annotations

import pytest

from zsadkit.methods import build_method, registered_methods


@pytest.mark.parametrize("name", registered_methods())
def test_an_unknown_option_is_named_with_the_valid_fields(name: str) -> None:
    with pytest.raises(TypeError, match=rf"^{name}: unknown options \['bogus'\]; \w+Config has \[.+\]$"):
        build_method(name, backbone="zsad-tiny", image_size=64, bogus=1)
