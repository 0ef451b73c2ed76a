"""Recipe TOML and --set overrides -> a validated, typed Recipe, or one line naming the key and the fix."""

from __future__ import annotations

import copy
import difflib
import tomllib
from pathlib import Path
from typing import get_args, get_origin

import tomli_w
from pydantic import BaseModel, ValidationError

from lorafit.errors import LorafitError
from lorafit.recipe.rules import refuse_undefined
from lorafit.recipe.schema import Recipe, is_local_data
from lorafit.storage import input_file

# Names users bring from peft and transformers, pointed at ours in error messages.
ALIASES = {
    "learning_rate": "lr",
    "r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size",
    "lr_scheduler_type": "schedule",
    "model_name_or_path": "name",
    "output_dir": "dir",
}


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override (`section.key=value`), validate, and resolve relative paths against the recipe's folder."""
    path = input_file(Path(path), "recipe", "pass --recipe with a TOML file such as recipes/tiny-sst2.toml")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise LorafitError(f"{path}: TOML syntax error: {error}; fix the line it names") from error
    except UnicodeDecodeError as error:
        raise LorafitError(f"{path} is not UTF-8 text; save the recipe as UTF-8") from error
    _resolve_paths(raw, path.parent)
    return with_overrides(raw, overrides, where=str(path))


def with_overrides(raw: dict, overrides: list[str], where: str = "recipe") -> Recipe:
    """`raw` (its paths resolved) with each `section.key=value` of `overrides` set, validated."""
    given, raw = override_table(overrides), copy.deepcopy(raw)
    _merge(raw, given)
    return validate(raw, where=where, overridden={f"{section}.{key}" for section in given for key in given[section]})


def override_table(overrides: list[str]) -> dict:
    """{section: {key: value}} of `section.key=value` items, paths resolved against the current folder."""
    table: dict = {}
    for item in overrides:
        _apply_override(table, item)
    _resolve_paths(table, Path.cwd())
    return table


def validate(raw: dict, where: str = "recipe", overridden: set[str] = frozenset()) -> Recipe:
    """The Recipe, or one line naming the key; a key given on the command line (`overridden`) is blamed there."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as error:
        problem = error.errors()[0]
        key = ".".join(str(part) for part in problem["loc"][:2])
        given, hint = [name for name in sorted(overridden) if name == key or name.startswith(f"{key}.")], ""
        if given:  # a key, or a section that only --set names (--set trian.lr=1)
            where = "--output" if given[0] == "output.dir" else f"--set {given[0]}"
            hint = f"; write a list as --set {key}=q,v or --set '{key}=[\"q\", \"v\"]'" if _is_list(key) else ""
        raise LorafitError(f"{where}: {_describe(problem)}{hint}") from error
    refuse_undefined(recipe, where)
    return recipe


def _describe(problem: dict) -> str:
    location = [str(part) for part in problem["loc"] if not str(part).startswith(("str", "dict"))]
    key = _key_name(location)
    if problem["type"] == "extra_forbidden":
        return f"unknown key {key}{_suggestion(location)}; remove it or fix its spelling"
    got = problem.get("input")
    return f"{key}: {problem['msg'].lower().removeprefix('value error, ')} (got {got!r}); fix the value"


def _key_name(location: list[str]) -> str:
    if len(location) == 1:
        return f"section [{location[0]}]"
    return f"[{location[0]}] {'.'.join(location[1:])}"


def _suggestion(location: list[str]) -> str:
    """Name the closest valid key, so a typo such as 'learning_rate' points to 'lr'."""
    choices = _keys_at(location[:-1])
    if choices is None:
        return ""
    alias = ALIASES.get(location[-1], location[-1])
    if alias in choices:
        return f" (did you mean {alias!r}?)"
    home = [name for name, field in Recipe.model_fields.items() if alias in field.annotation.model_fields]
    if len(location) > 1 and home:  # a key of another section, such as [lora] learning_rate
        return f" (did you mean [{home[0]}] {alias}?)"
    close = difflib.get_close_matches(location[-1], choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(choices)})"


def _keys_at(location: list[str]) -> list[str] | None:
    """The keys the schema allows in a section or sub-table ([] is the top level), or None if it has none."""
    table: type[BaseModel] | None = Recipe
    for name in location:
        field = table.model_fields.get(name)
        kinds = (field.annotation, *get_args(field.annotation)) if field else ()
        table = next((kind for kind in kinds if isinstance(kind, type) and issubclass(kind, BaseModel)), None)
        if table is None:
            return None
    return list(table.model_fields)


def _apply_override(raw: dict, item: str) -> None:
    """`train.lr=1e-3`, or `lora.adalora.init_rank=4` for a sub-table's key: the value is read as TOML (numbers,
    booleans, lists), else taken as a plain string; a list key also takes comma-separated words (q,v)."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    sub_table_key = len(parts) == 3 and _keys_at(parts[:2]) is not None  # e.g. lora.adalora.init_rank
    if not sep or not all(parts) or not (len(parts) == 2 or sub_table_key):
        raise LorafitError(f"--set {item!r} is not section.key=value; write e.g. --set train.lr=1e-3")
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        value = text
    if _is_list(key.strip()) and not isinstance(value, list):  # q,v or all-linear
        value = [word.strip() for word in text.split(",") if word.strip()]
    section = raw
    for depth, name in enumerate(parts[:-1], start=1):
        section = section.setdefault(name, {})
        if not isinstance(section, dict):
            raise LorafitError(f"--set {item!r}: [{'.'.join(parts[:depth])}] is not a section")
    section[parts[-1]] = value


def _is_list(key: str) -> bool:
    """Whether `section.key` is a list in the schema (lora.targets, data.labels, train.report_to)."""
    section, _, name = key.partition(".")
    field = Recipe.model_fields[section].annotation.model_fields.get(name) if section in Recipe.model_fields else None
    return field is not None and get_origin(field.annotation) is list


def _merge(raw: dict, updates: dict) -> None:
    """Overrides over `raw`: a sub-table's keys are set one by one, so `--set lora.adalora.init_rank=4` keeps the
    recipe's other [lora.adalora] keys."""
    for section, values in updates.items():
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise LorafitError(f"--set {section}.{next(iter(values))}: [{section}] is not a section of the recipe; "
                               f"fix its {section} = ... line")
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key].update(value)
            else:
                target[key] = value


def _resolve_paths(raw: dict, base: Path) -> None:
    """Make file-like values absolute: the model folder, local data files and the output folder."""
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("name"), str):
        name = model["name"]
        if name.startswith((".", "~")) or (base / name).is_dir():
            model["name"] = _absolute(name, base)
    data = raw.get("data")
    if isinstance(data, dict):
        source = data.get("source")
        if isinstance(source, str) and (is_local_data(source) or source.startswith((".", "~")) or (base / source).is_dir()):
            data["source"] = _absolute(source, base)
        elif isinstance(source, (list, dict)):
            data["source"] = _absolute_files(source, base)
    output = raw.get("output")
    if isinstance(output, dict) and isinstance(output.get("dir"), str) and output["dir"].strip():  # "" stays an error
        output["dir"] = _absolute(output["dir"], base)


def _absolute_files(files, base: Path):
    """A list of files, or {split: files}, with every file name made absolute (anything else left to the schema)."""
    if isinstance(files, dict):
        return {split: _absolute_files(value, base) for split, value in files.items()}
    if isinstance(files, list):
        return [_absolute_files(value, base) for value in files]
    return _absolute(files, base) if isinstance(files, str) else files


def _absolute(value: str, base: Path) -> str:
    return str((base / Path(value).expanduser()).resolve())


def recipe_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML, for the run directory."""
    return tomli_w.dumps(recipe.model_dump(exclude_none=True))
