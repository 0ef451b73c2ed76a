"""llama.cpp itself, where llama-cpp-python is installed: logits with the exported GGUF adapter equal peft's.

Opt-in (marker `llamacpp`): llama-cpp-python builds llama.cpp from source, so CI's default path never has it.
The check is bench/llamacpp_parity.py's, run here on a fresh folder.
"""
from __future__ import annotations

import importlib.util

import pytest
from conftest import REPO

pytestmark = pytest.mark.llamacpp
pytest.importorskip("llama_cpp")
pytest.importorskip("peft")
pytest.importorskip("gguf")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_llama_cpp_logits_with_the_exported_adapter_match_transformers_and_peft(tmp_path, arch):
    spec = importlib.util.spec_from_file_location("llamacpp_parity", REPO / "bench" / "llamacpp_parity.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    figures = parity.run(tmp_path, arch)
    tolerance = parity.TOLERANCE[arch]
    assert figures["adapter_effect"] > 100 * tolerance  # the adapter visibly moves the logits
    assert figures["base_max_abs_diff"] < tolerance, figures
    assert figures["adapter_max_abs_diff"] < tolerance, figures
    assert figures["greedy_tokens_equal"], figures
