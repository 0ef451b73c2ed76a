"""The recipe: its schema (schema.py), the rules across its keys (rules.py), and reading it from TOML (reading.py)."""

from lorafit.recipe.reading import load_recipe, override_table, recipe_toml, validate, with_overrides
from lorafit.recipe.rules import refuse_undefined
from lorafit.recipe.schema import (
    DATA_SUFFIXES,
    GENERATION_METRICS,
    RESUMABLE,
    AdaLoraSection,
    DataSection,
    EvalSection,
    LoraSection,
    ModelSection,
    OutputSection,
    Recipe,
    TrainSection,
    VariantName,
    changed_keys,
    is_local_data,
    resumable_keys,
)

__all__ = [
    "DATA_SUFFIXES", "GENERATION_METRICS", "RESUMABLE", "AdaLoraSection", "DataSection", "EvalSection", "LoraSection",
    "ModelSection", "OutputSection", "Recipe", "TrainSection", "VariantName", "changed_keys", "is_local_data",
    "load_recipe", "override_table", "recipe_toml", "refuse_undefined", "resumable_keys", "validate", "with_overrides",
]
