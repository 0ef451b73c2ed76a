"""What `make test` prints besides the results: the known warnings of the libraries are filtered in pyproject.toml's
pytest settings, lorafit's own are not."""

from __future__ import annotations

import tomllib
import warnings

from _pytest.config import parse_warning_filter
from conftest import REPO

SETTINGS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]


def shown(message: str, category: type[Warning], module: str) -> bool:
    """Whether a warning raised in `module` passes the project's filters (applied as pytest applies them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for line in SETTINGS["filterwarnings"]:
            warnings.filterwarnings(*parse_warning_filter(line, escape=False))
        warnings.warn_explicit(message, category, filename=f"{module.replace('.', '/')}.py", lineno=1, module=module)
    return bool(caught)


def test_the_known_library_warnings_are_filtered_and_lorafits_own_are_shown():
    gradient_checkpointing = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    assert not shown(gradient_checkpointing, FutureWarning, "transformers.modeling_utils")
    assert not shown("fan_in_fan_out is set to False but the target module is `Conv1D`.", UserWarning,
                     "peft.tuners.lora.layer")
    assert not shown("Setting `save_embedding_layers` to `True`", UserWarning, "peft.utils.save_and_load")
    assert shown("a rank above the module's side", UserWarning, "lorafit.model.inject")
    assert shown("this key is deprecated", DeprecationWarning, "lorafit.recipe")
    assert shown("an unknown FutureWarning", FutureWarning, "transformers.modeling_utils")

