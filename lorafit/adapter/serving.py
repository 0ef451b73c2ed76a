"""What goes beside an exported adapter so the engine chats as training did: the chat template, and a generation
config that stops at the template's end-of-turn token; and the command that serves the result."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from lorafit.adapter.engines import FIXED, NOTE, Engine, Problem
from lorafit.data.chat import TEMPLATE_FILE, end_of_turn_token
from lorafit.errors import LorafitError

if TYPE_CHECKING:
    from lorafit.adapter.export import Adapter

GENERATION_FILE = "generation_config.json"


def chat_files(adapter: Adapter, engine: Engine) -> tuple[dict[str, bytes], list[Problem]]:
    """The adapter's chat template, and a generation config when the base's would not stop at its end of turn."""
    path = adapter.directory / TEMPLATE_FILE
    if not path.is_file():
        return {}, []
    template = path.read_text()
    files = {TEMPLATE_FILE: template.encode()}
    if adapter.base_name is None:
        return files, [Problem("eos", NOTE, f"the adapter was trained with its own chat template ({TEMPLATE_FILE}, "
                               "copied beside it); pass --base BASE to check that generation stops at the end of "
                               "its assistant turns")]
    from lorafit.model.load import load_tokenizer

    try:
        tokenizer = load_tokenizer(adapter.base_name)
    except LorafitError as problem:
        return files, [Problem("eos", NOTE, f"the end of turn was not checked: {problem}")]
    end = end_of_turn_token(tokenizer, template)
    generation = _generation_config(adapter.base_name)
    configured = generation.get("eos_token_id")
    stops = set(configured if isinstance(configured, list) else [configured]) | {tokenizer.eos_token_id}
    if end is None or end in stops:
        return files, []
    generation["eos_token_id"] = sorted(stop for stop in stops | {end} if stop is not None)
    token = tokenizer.convert_ids_to_tokens(end)
    text = (f"the chat template ends an assistant turn with {token!r} (id {end}), which the base's generation "
            "config does not stop at, so replies would run on")
    if engine.gguf:
        return files, [Problem("eos", NOTE, f"{text}; llama.cpp takes end-of-generation tokens from the GGUF base's "
                               "vocabulary: check that it marks this one (llama-server logs its EOG tokens)")]
    files[GENERATION_FILE] = (json.dumps(generation, indent=2) + "\n").encode()
    return files, [Problem("eos", FIXED, f"{text}: written {GENERATION_FILE} with it among eos_token_id")]


def _generation_config(base: str) -> dict:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(base).to_diff_dict()
    except (OSError, ValueError):
        from lorafit.model.load import load_config

        return {"eos_token_id": getattr(load_config(base), "eos_token_id", None)}


def serve_hint(engine: Engine, out: Path, base: str | None, *, merged: bool, chat: bool) -> str:
    """The command that serves what export wrote."""
    base = base or "BASE"
    template = out / TEMPLATE_FILE
    generation = (out / GENERATION_FILE).is_file()
    if engine.name == "vllm":
        head = f"vllm serve {out}" if merged else f"vllm serve {base} --enable-lora --lora-modules adapter={out}"
        return head + (f" --chat-template {template}" if chat else "") + \
            (f" --generation-config {out}" if generation and not merged else "")
    if engine.name == "sglang":
        head = f"python -m sglang.launch_server --model-path {out if merged else base}"
        return head + ("" if merged else f" --enable-lora --lora-paths adapter={out}") + \
            (f" --chat-template {template}" if chat else "")
    if engine.name == "llamacpp":
        if merged:
            return f"python convert_hf_to_gguf.py {out} (llama.cpp), then llama-server -m the GGUF it writes"
        return f"llama-server -m BASE.gguf --lora {out / 'adapter.gguf'}" + \
            (f" --jinja --chat-template-file {template}" if chat else "")
    if merged:
        return f"AutoModelForCausalLM.from_pretrained({str(out)!r})"
    return f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {str(out)!r})"
