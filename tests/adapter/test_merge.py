"""`lorafit merge`: the merged folder is a plain model with the adapter's logits; bad input changes nothing."""

from __future__ import annotations

import importlib.abc
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import (
    LLAMA_SHAPE,
    SMALL,
    VOCAB,
    assert_one_line_error,
    assert_same,
    logits,
    peft_logits,
    peft_written,
    saved_adapter,
    snapshot,
    tiny_model,
)
from safetensors import safe_open
from typer.testing import CliRunner

from lorafit.adapter.merge import merge_adapter
from lorafit.cli import app
from lorafit.errors import LorafitError

pytest.importorskip("peft")


def saved_base(arch: str, directory: Path) -> Path:
    tiny_model(arch).save_pretrained(directory)
    return directory


def plain(directory: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def tensor_names(directory: Path) -> set[str]:
    names = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as weights:
            names |= set(weights.keys())
    return names


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_merged_model_matches_peft_and_the_unmerged_adapter(arch, tmp_path, tokens):
    base = saved_base(arch, tmp_path / "base")
    wrapped = saved_adapter(arch, tmp_path / "adapter")

    result = merge_adapter(str(base), tmp_path / "adapter", tmp_path / "out", force=False)

    merged = logits(plain(tmp_path / "out"), tokens)
    assert_same(merged, logits(wrapped, tokens))
    assert_same(merged, peft_logits(arch, tmp_path / "adapter", tokens))
    assert (merged - logits(tiny_model(arch), tokens)).abs().max() > 1e-2
    assert result["base"] == str(base) and result["out"] == str(tmp_path / "out")
    assert result["adapter"] == str(tmp_path / "adapter")
    assert result["probe_tokens"] == 64 and 0 <= result["max_logit_diff"] < 1e-4
    assert not any("lora" in name for name in tensor_names(tmp_path / "out"))
    assert {"config.json", "generation_config.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]  # no staging left behind
    assert any("tokenizer" in note for note in result["notes"])


class RefuseImports(importlib.abc.MetaPathFinder):
    """An import hook under which lorafit and peft look uninstalled."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ImportError(f"{name} is not installed here")


HIDDEN = ("lorafit", "peft")


def test_merged_folder_loads_without_lorafit_or_peft(tmp_path, tokens, monkeypatch):
    base = saved_base("gpt2", tmp_path / "base")
    wrapped = saved_adapter("gpt2", tmp_path / "adapter")
    merge_adapter(str(base), tmp_path / "adapter", tmp_path / "out", force=False)
    expected = logits(wrapped, tokens)

    monkeypatch.setattr(sys, "meta_path", [RefuseImports(), *sys.meta_path])
    for name in [name for name in sys.modules if name.partition(".")[0] in HIDDEN]:
        monkeypatch.delitem(sys.modules, name)
    assert not (tmp_path / "out" / "adapter_config.json").exists()  # transformers would hand it to peft
    assert_same(logits(plain(tmp_path / "out"), tokens), expected)
    assert not [name for name in sys.modules if name.partition(".")[0] in HIDDEN]


@pytest.mark.parametrize("arch,use_rslora", [("gpt2", True), ("llama", False), ("gpt_neox", True)])
def test_merge_reproduces_an_adapter_written_by_peft(arch, use_rslora, tmp_path, tokens):
    base = saved_base(arch, tmp_path / "base")
    peft_model = peft_written(arch, tmp_path / "adapter", use_rslora=use_rslora)

    merge_adapter(str(base), tmp_path / "adapter", tmp_path / "out", force=False)
    assert_same(logits(plain(tmp_path / "out"), tokens), logits(peft_model, tokens))


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def test_merge_copies_the_base_tokenizer(tmp_path):
    base = saved_base("llama", tmp_path / "base")
    word_tokenizer().save_pretrained(base)
    saved_adapter("llama", tmp_path / "adapter")

    result = merge_adapter(str(base), tmp_path / "adapter", tmp_path / "out", force=False)

    assert result["notes"] == []
    copied = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert copied("w5 w7 nope").input_ids == [5, 7, 0]
    assert copied.pad_token is None  # copied as it was, not given a pad token


def test_force_replaces_an_existing_out_completely(tmp_path, tokens):
    base = saved_base("llama", tmp_path / "base")
    wrapped = saved_adapter("llama", tmp_path / "adapter")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("from an older merge")

    merge_adapter(str(base), tmp_path / "adapter", tmp_path / "out", force=True)

    assert "stale.txt" not in {p.name for p in (tmp_path / "out").iterdir()}
    assert_same(logits(plain(tmp_path / "out"), tokens), logits(wrapped, tokens))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]


def test_force_never_replaces_the_adapter_it_reads(tmp_path):
    base = saved_base("llama", tmp_path / "base")
    saved_adapter("llama", tmp_path / "adapter")
    before = snapshot(tmp_path)
    with pytest.raises(LorafitError, match="holds the adapter"):
        merge_adapter(str(base), tmp_path / "adapter", tmp_path / "adapter", force=True)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- the CLI


def wider_llama(directory: Path) -> Path:
    config = transformers.LlamaConfig(**{**LLAMA_SHAPE, "hidden_size": 64}, **SMALL)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def pickle_only(directory: Path) -> None:
    saved_adapter("gpt2", directory)
    (directory / "adapter_model.safetensors").unlink()
    (directory / "adapter_model.bin").write_bytes(b"never unpickled")


def setup_refusal(case: str, root: Path) -> tuple[list[str], str]:
    """Build the folders for one refusal; returns the merge arguments and the expected message."""
    gpt2 = str(saved_base("gpt2", root / "gpt2"))
    adapter, out = root / "adapter", root / "out"
    if case == "missing-adapter":
        return [gpt2, str(adapter), str(out)], "does not exist"
    if case == "no-adapter-config":
        adapter.mkdir()
        return [gpt2, str(adapter), str(out)], "is not an adapter directory (no adapter_config.json)"
    if case == "other-architecture":
        saved_adapter("gpt2", adapter)
        return [str(saved_base("llama", root / "llama")), str(adapter), str(out)], "was it trained for another"
    if case == "other-size":
        saved_adapter("llama", adapter)
        return [str(wider_llama(root / "wide")), str(adapter), str(out)], "adapter for d_in=32 but base has 64"
    if case == "existing-out":
        saved_adapter("gpt2", adapter)
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        return [gpt2, str(adapter), str(out)], "exists; pass --force to replace it"
    if case == "pickle-only":
        pickle_only(adapter)
        return [gpt2, str(adapter), str(out)], "has only adapter_model.bin"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["missing-adapter", "no-adapter-config", "other-architecture", "other-size", "existing-out", "pickle-only"]
)
def test_cli_merge_refuses_bad_input_with_one_line_and_writes_nothing(case, tmp_path):
    arguments, message = setup_refusal(case, tmp_path)
    before = snapshot(tmp_path)

    result = CliRunner().invoke(app, ["merge", *arguments])

    assert message in assert_one_line_error(result)
    assert snapshot(tmp_path) == before


def test_cli_merge_json_prints_only_the_result(tmp_path):
    base = saved_base("gpt2", tmp_path / "base")
    saved_adapter("gpt2", tmp_path / "adapter")

    result = CliRunner().invoke(app, ["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "out"), "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"base", "adapter", "out", "max_logit_diff", "probe_tokens"} <= set(report)
    assert report["max_logit_diff"] < 1e-4 and (tmp_path / "out" / "config.json").is_file()


def test_merge_keeps_a_bf16_base_in_bf16(tmp_path, tokens):
    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "base")
    wrapped = saved_adapter("llama", tmp_path / "adapter")

    result = merge_adapter(str(tmp_path / "base"), tmp_path / "adapter", tmp_path / "out", force=False)

    assert result["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}  # noqa: SIM118
    merged = plain(tmp_path / "out").float()
    # One bf16 rounding of W0 + ΔW: close to the fp32 adapter on the bf16 base, nowhere near the bare base.
    bf16_base = tiny_model("llama").to(torch.bfloat16).float()
    assert (logits(merged, tokens) - logits(bf16_base, tokens)).abs().max() > 1e-1
    torch.testing.assert_close(logits(merged, tokens), logits(wrapped, tokens), rtol=0.05, atol=0.05)
