"""Nothing lorafit does runs code it was handed: no pickle is ever read, no remote code is trusted by default."""

from __future__ import annotations

import ast

import pytest
import transformers
from conftest import REPO

from lorafit.recipe_file import load_recipe
from lorafit.train.loop import train

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


# ---------------------------------------------------------------- nothing is unpickled


def unsafe_loads(source: str) -> list[str]:
    """Calls and imports in `source` that would unpickle data: torch.load, pickle & co., np.load(allow_pickle=True)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = {alias.name for alias in node.names}
            if module.split(".")[0] in PICKLE_MODULES or (module == "torch" and "load" in names):
                found.append(f"from {module} import {', '.join(sorted(names))}")
            if module == "torch.serialization":
                found.append("from torch.serialization import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if node.func.attr == "load" and isinstance(owner, ast.Name) and owner.id == "torch":
                found.append("torch.load(...)")
            if any(k.arg == "allow_pickle" for k in node.keywords):
                found.append(f"{node.func.attr}(allow_pickle=...)")
    return found


def test_the_unsafe_load_scanner_finds_pickle_loads():
    source = "import pickle\nfrom torch import load\nx = torch.load('a')\nnp.load('b', allow_pickle=True)\n"
    assert len(unsafe_loads(source)) == 4


def test_lorafit_never_unpickles():
    package = REPO / "lorafit"
    found = {str(path.relative_to(package)): unsafe_loads(path.read_text()) for path in sorted(package.rglob("*.py"))}
    assert len(found) > 40  # every module, in the packages too
    assert {name: calls for name, calls in found.items() if calls} == {}


# ---------------------------------------------------------------- no remote code unless the recipe says so


@pytest.fixture
def loader_calls(monkeypatch) -> list[tuple[str, dict]]:
    """Record the keyword arguments of every AutoConfig/AutoTokenizer/AutoModelForCausalLM.from_pretrained."""
    calls: list[tuple[str, dict]] = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained

        def recording(name, *args, _real=real, _cls=cls.__name__, **kwargs):
            calls.append((_cls, kwargs))
            return _real(name, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recording)
    return calls


@pytest.mark.parametrize("allowed", [False, True])
def test_remote_code_is_trusted_only_when_the_recipe_says_so(tiny_recipe, loader_calls, allowed):
    model_section = {"trust_remote_code": True} if allowed else {}
    recipe = load_recipe(
        tiny_recipe(model=model_section, train={"max_steps": 1, "batch_size": 2}, data={"max_eval_examples": 2})
    )
    train(recipe)
    assert {cls for cls, _ in loader_calls} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert [kwargs.get("trust_remote_code") for _, kwargs in loader_calls] == [allowed] * len(loader_calls)
