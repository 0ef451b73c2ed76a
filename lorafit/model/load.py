"""Load a causal LM, its config and tokenizer from a hub id or a local folder, with errors a user can act on."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.model.inject import replace_module

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# transformers activations written as chains of elementwise ops that compute GELU's tanh approximation,
# 0.5·x·(1 + tanh(sqrt(2/pi)·(x + 0.044715·x³))). Autograd keeps four [tokens, d_ff] tensors per layer for
# them; PyTorch's own kernel computes the same function and keeps only its input.
COMPOSED_TANH_GELUS = {"NewGELUActivation", "FastGELUActivation", "AccurateGELUActivation"}


SAMPLE = 1 << 16  # bytes of each weight file that weights_fingerprint reads, at three places


def resolve_precision(dtype: str, mixed_precision: str, *, cuda_bf16: bool | None = None) -> tuple[str, str]:
    """(weights dtype, mixed precision) for a recipe on this machine.

    "auto" means bf16 weights and bf16 autocast on a CUDA device that supports bf16, and float32 without
    autocast elsewhere ("auto" never gives fp16, so the recipe alone refuses fp16 weights without fp16 loss scaling).
    """
    if cuda_bf16 is None:
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    weights = ("bfloat16" if cuda_bf16 else "float32") if dtype == "auto" else dtype
    mixed = ("bf16" if cuda_bf16 else "no") if mixed_precision == "auto" else mixed_precision
    return weights, mixed


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _check_source(name: str) -> None:
    """A local folder must hold a config.json; anything else is taken as a hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LorafitError(f"model folder {name} has no config.json; point [model] name at a saved model folder")
    elif _looks_like_path(name):
        raise LorafitError(f"model folder {name} does not exist; fix the path or give a hub id such as 'gpt2'")


def _hub_error(name: str) -> LorafitError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = "unset HF_HUB_OFFLINE or use a local folder" if offline else "check the id and your connection, or use a local folder"
    return LorafitError(f"could not load model {name!r} from the Hugging Face hub ({hint})")


def load_config(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoConfig

    _check_source(name)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error):  # transformers' several-line request to run the model's own code
            raise LorafitError(f"{name} needs its own Python code to load; if you trust that code, set [model] "
                               "trust_remote_code = true in the recipe") from error
        if Path(name).expanduser().is_dir():
            raise LorafitError(f"{name}/config.json is not a model config ({error}); re-save the model") from error
        raise _hub_error(name) from error


def meta_model(config) -> nn.Module:
    """The model's structure with no memory behind it: enough to count and wrap, nothing read or downloaded."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_model(name: str, dtype: str = "float32", *, trust_remote_code: bool = False, allow_pickle: bool = False) -> nn.Module:
    """The model's weights, from safetensors only: a pickle can run code, so it is read only from a local
    folder whose recipe says `allow_pickle = true`."""
    from transformers import AutoModelForCausalLM

    load_config(name, trust_remote_code=trust_remote_code)
    local = Path(name).expanduser().is_dir()
    if local:
        check_safetensors(name, allow_pickle=allow_pickle)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
            use_safetensors=None if local and allow_pickle else True,
        )
    except (OSError, ValueError) as error:
        if local:
            raise LorafitError(f"could not load the weights in {name}: {error}") from error
        raise _hub_error(name) from error
    return model


def check_safetensors(name: str, *, allow_pickle: bool = False) -> None:
    """Refuse a local model folder whose weights are pickles only, naming the one-off conversion."""
    folder = Path(name).expanduser()
    pickles = sorted(p.name for p in folder.glob("*.bin") if p.name.startswith("pytorch_model"))
    if allow_pickle or not pickles or any(folder.glob("*.safetensors")):
        return
    raise LorafitError(
        f"model folder {name} holds only pickled weights ({pickles[0]}), which lorafit does not read; convert them "
        f"once with: python -c \"from transformers import AutoModelForCausalLM as M; "
        f"M.from_pretrained('{name}').save_pretrained('{name}')\" (it writes model.safetensors), "
        "or set [model] allow_pickle = true for a folder you trust"
    )


def context_length(config) -> int | None:
    """The longest sequence the model's positions cover, where its config says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context_length(config, max_length: int) -> None:
    """Rows longer than the model's positions cannot be run: refuse such a [data] max_length up front."""
    context = context_length(config)
    if context is not None and max_length > context:
        raise LorafitError(
            f"[data] max_length = {max_length} is longer than the model's context of {context} tokens; "
            f"set max_length to {context} or less"
        )


def weights_fingerprint(name: str, config) -> str:
    """What identifies the base weights without reading them: the hub commit, or for a local folder a hash of
    each weight file's name, size, safetensors header and three 64 KiB samples (start, middle, end)."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return f"hub:{name}@{getattr(config, '_commit_hash', None) or 'unknown'}"
    digest = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as handle:
            if path.suffix == ".safetensors":
                header = int.from_bytes(handle.read(8), "little")
                digest.update(handle.read(min(header, size)))
            for offset in (0, size // 2, max(0, size - SAMPLE)):
                handle.seek(offset)
                digest.update(handle.read(SAMPLE))
    return f"sha256:{digest.hexdigest()}"


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    """The model's tokenizer, with padding on the right and a pad token (eos when the model has none)."""
    from transformers import AutoTokenizer

    _check_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        if not Path(name).expanduser().is_dir():
            raise _hub_error(name) from error
        raise LorafitError(f"could not load a tokenizer for {name!r}; save one beside the model") from error
    if knows_only_special_tokens(tokenizer):
        raise LorafitError(f"{name!r} has no tokenizer files (or an empty tokenizer); save the model's tokenizer beside it")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def knows_only_special_tokens(tokenizer) -> bool:
    """transformers 5 builds a tokenizer of special tokens alone for a folder without tokenizer files."""
    added = {token.content for token in tokenizer.added_tokens_decoder.values()}
    return all(token in added for token in tokenizer.get_vocab())


def fuse_activations(model: nn.Module) -> int:
    """Swap composed tanh-GELU modules for `nn.GELU(approximate="tanh")`; returns how many were swapped.

    Same function to float rounding, one kernel instead of seven, and a quarter of the MLP's saved
    activations: GPT-2's gelu_new alone is most of a LoRA step's activation memory.
    """
    paths = [path for path, module in model.named_modules() if type(module).__name__ in COMPOSED_TANH_GELUS]
    for path in paths:
        replace_module(model, path, nn.GELU(approximate="tanh"))
    return len(paths)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the one ModuleList as long as the model has layers."""
    depth = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return module
    raise LorafitError(
        f"cannot find the {depth} decoder blocks of this {model.config.model_type} model, which [train] compile and "
        "parallel = 'fsdp' work on; turn them off for this model"
    )


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward; transformers 5 renamed the switch."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
