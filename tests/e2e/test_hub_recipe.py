"""The hub recipe (gpt2 on glue/sst2) runs offline once its model and dataset are swapped for local look-alikes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import REPO, TINY_DATA, TINY_MODEL
from typer.testing import CliRunner

from lorafit.cli import app
from lorafit.data.rows import load_rows
from lorafit.errors import LorafitError
from lorafit.recipe_file import load_recipe

HUB_RECIPE = REPO / "recipes" / "gpt2-sst2.toml"
GLUE_README = """---
configs:
- config_name: sst2
  data_files:
  - split: train
    path: sst2/train.jsonl
  - split: validation
    path: sst2/validation.jsonl
---
"""


def write_sst2_splits(folder: Path) -> None:
    """16 train and 8 validation rows with glue/sst2's columns: sentence, label (int), idx."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (TINY_DATA / "train.jsonl").read_text().splitlines()[:24]]
    for split, part in (("train", rows[:16]), ("validation", rows[16:])):
        lines = [
            json.dumps({"sentence": r["sentence"], "label": r["label"], "idx": i}) + "\n" for i, r in enumerate(part)
        ]
        (folder / f"{split}.jsonl").write_text("".join(lines))


@pytest.fixture(scope="module")
def hub_lookalikes(tmp_path_factory):
    """A random GPT-2 saved like a hub model, and a dataset folder laid out like the glue repo (config sst2)."""
    root = tmp_path_factory.mktemp("hub")
    model_dir = root / "gpt2-local"
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_MODEL)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_MODEL / name, model_dir / name)
    glue = root / "glue-local"
    write_sst2_splits(glue / "sst2")
    (glue / "README.md").write_text(GLUE_README)
    return model_dir, glue


@pytest.mark.slow
def test_hub_recipe_runs_with_only_model_and_data_swapped_for_local_copies(hub_lookalikes, tmp_path):
    model_dir, glue = hub_lookalikes
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--recipe",
            str(HUB_RECIPE),
            "--set",
            f'model.name="{model_dir}"',
            "--set",
            f'data.source="{glue}"',
            "--set",
            "train.max_steps=2",
            "--set",
            "train.batch_size=4",
            "--output",
            str(run),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["throughput"]["steps"] == 2
    assert report["eval"]["examples"] == 8
    saved = load_recipe(run / "recipe.toml")
    hub = load_recipe(HUB_RECIPE)
    assert saved.model.name == str(model_dir) and saved.data.source == str(glue)
    assert saved.lora == hub.lora
    assert saved.data.model_copy(update={"source": hub.data.source}) == hub.data
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        model_dir
    )


def test_plain_split_folder_needs_the_hub_config_cleared(tmp_path):
    """A folder of train/validation files has no 'sst2' config; `--set data.config=` (empty) clears the recipe's."""
    write_sst2_splits(tmp_path / "sst2")
    with pytest.raises(LorafitError, match="sst2"):
        load_rows(load_recipe(HUB_RECIPE, [f'data.source="{tmp_path / "sst2"}"']).data, "train")
    recipe = load_recipe(HUB_RECIPE, [f'data.source="{tmp_path / "sst2"}"', "data.config="])
    assert len(load_rows(recipe.data, "train")) == 16
    assert len(load_rows(recipe.data, "validation")) == 8
