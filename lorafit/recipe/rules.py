"""The recipe's rules across keys, checked as it is read: combinations lorafit does not define."""

from __future__ import annotations

from lorafit.errors import LorafitError
from lorafit.recipe.schema import Recipe, is_local_data


def refuse_undefined(recipe: Recipe, where: str = "recipe") -> None:
    """Keys valid one by one that together name something lorafit does not define, one line each: the home of every
    rule that reads two or more keys and needs neither the model nor the data (those are in train/preflight.py)."""
    from lorafit.lora.variants import refusal  # each variant's and each start's own rules

    if recipe.model.quantize != "none" and recipe.train.parallel != "ddp":
        raise LorafitError(
            f"{where}: [model] quantize with [train] parallel = {recipe.train.parallel!r} is not supported; use 'ddp'"
        )
    problem = refusal(recipe.lora, recipe.train)
    if problem:
        raise LorafitError(f"{where}: {problem}")
    if recipe.eval.metrics and recipe.data.task not in ("completion", "chat"):
        raise LorafitError(
            f"{where}: [eval] metrics score generated text, which task = {recipe.data.task!r} does not produce; "
            "use them with task = 'completion' or 'chat', or remove them"
        )
    problem = _data_and_train_problem(recipe)
    if problem:
        raise LorafitError(f"{where}: {problem}")


def _data_and_train_problem(recipe: Recipe) -> str | None:
    """The first combination of [model], [data] and [train] keys that cannot work, said with its fix; None if none."""
    model, data, train = recipe.model, recipe.data, recipe.train
    local = is_local_data(data.source)
    if model.dtype == "float16" and train.mixed_precision != "fp16":  # "auto" never resolves to fp16
        return ("[model] dtype = 'float16' trains without loss scaling unless [train] mixed_precision = 'fp16'; "
                "set that, or use bfloat16 or float32 weights")
    if train.keep_best and not train.eval_every:
        return "[train] keep_best needs evaluations during training to choose from; set [train] eval_every"
    if data.task == "text" and data.stride >= data.max_length - 1:
        return (f"[data] stride = {data.stride} leaves no new tokens in a window of max_length = {data.max_length}; "
                "make stride smaller than max_length - 1")
    if data.task != "text" and data.stride:
        return (f"[data] stride windows long documents of task = 'text' only, and task = {data.task!r} does not read "
                "it; remove stride")
    if train.shard_size and train.parallel != "hsdp":
        return (f"[train] shard_size groups processes for parallel = 'hsdp' only, and parallel = {train.parallel!r} "
                "does not read it; set parallel = 'hsdp' or remove shard_size")
    if data.task == "chat" and data.template != "{text}":
        return ("[data] template is not used by task = 'chat', whose rows the chat template formats; remove it "
                "(or give [data] chat_template)")
    if local and data.task != "text" and any(name.endswith(".txt") for name in _file_names(data.source)):
        return (f"[data] source has .txt files, which hold plain documents that only task = 'text' reads; "
                f"convert them to .jsonl rows for task = {data.task!r}")
    if data.streaming and local:
        return ("[data] streaming draws rows from a hub data set or a dataset folder, and local files are read "
                "whole; set streaming = false")
    if data.streaming and not train.max_steps:
        return "[data] streaming has no end to count epochs by; set [train] max_steps"
    if data.streaming and data.eval_fraction:
        return "[data] eval_fraction holds out a share of the whole data set, which streaming never reads; use eval_split"
    if data.streaming and data.eval_split and not data.max_eval_examples:
        return ("[data] streaming draws the evaluation split as well; set [data] max_eval_examples (e.g. 500), "
                'or eval_split = "" for no evaluation')
    return None


def _file_names(source) -> list[str]:
    if isinstance(source, str):
        return [source]
    return [name for value in (source.values() if isinstance(source, dict) else source) for name in _file_names(value)]
