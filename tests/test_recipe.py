"""The recipe schema: DESIGN.md's keys and types, defaults, errors that name the key, --set, and path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from lorafit.errors import LorafitError
from lorafit.recipe import Recipe, load_recipe, recipe_toml, validate

REPO = Path(__file__).resolve().parents[1]

# Every key DESIGN.md promises, with a value of the documented type that differs from the default.
DESIGN_RECIPE = {
    "model": {"name": "gpt2", "dtype": "bfloat16"},
    "lora": {"rank": 4, "alpha": 32, "dropout": 0.1, "targets": ["q", "k", "v", "c_proj"]},
    "data": {
        "source": "glue",
        "config": "sst2",
        "task": "classification",
        "text_field": "text",
        "label_field": "y",
        "labels": ["bad", "good"],
        "template": "Review: {text}\nSentiment:",
        "train_split": "tr",
        "eval_split": "te",
        "max_length": 64,
    },
    "train": {
        "max_steps": 7,
        "epochs": 3,
        "batch_size": 2,
        "grad_accum": 4,
        "lr": 1e-3,
        "warmup_steps": 5,
        "schedule": "cosine",
        "weight_decay": 0.01,
        "max_grad_norm": 0.5,
        "seed": 3,
        "mixed_precision": "bf16",
        "save_every": 100,
        "log_every": 5,
    },
    "output": {"dir": "/tmp/lorafit-test-run"},
}


def write_toml(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(raw))
    return path


def error_of(raw: dict) -> str:
    with pytest.raises(LorafitError) as caught:
        validate(raw)
    assert caught.value.exit_code == 2
    return str(caught.value)


# ---------------------------------------------------------------- the schema


def test_every_design_key_is_accepted_with_its_value(tmp_path):
    recipe = load_recipe(write_toml(tmp_path / "r.toml", DESIGN_RECIPE))
    for section, values in DESIGN_RECIPE.items():
        for key, value in values.items():
            assert getattr(getattr(recipe, section), key) == value, f"[{section}] {key}"


@pytest.mark.parametrize(
    ("section", "key", "choices"),
    [
        ("model", "dtype", ["auto", "float32", "bfloat16", "float16"]),
        ("data", "task", ["classification", "completion", "text"]),
        ("train", "schedule", ["linear", "cosine", "constant"]),
        ("train", "mixed_precision", ["auto", "no", "bf16", "fp16"]),
        ("train", "parallel", ["ddp", "fsdp"]),
    ],
)
def test_every_documented_choice_is_accepted(section, key, choices):
    for choice in choices:
        raw = {section: {key: choice}}
        if choice == "float16":  # fp16 weights are only defined with fp16 loss scaling
            raw["train"] = {"mixed_precision": "fp16"}
        assert getattr(getattr(validate(raw), section), key) == choice


def test_data_source_may_be_one_file_per_split():
    recipe = validate({"data": {"source": {"train": "/d/a.jsonl", "validation": "/d/b.jsonl"}}})
    assert recipe.data.source == {"train": "/d/a.jsonl", "validation": "/d/b.jsonl"}


def test_integer_is_accepted_where_a_float_is_expected():
    recipe = validate({"lora": {"alpha": 16}, "train": {"lr": 1}})
    assert isinstance(recipe.lora.alpha, float) and recipe.lora.alpha == 16.0
    assert isinstance(recipe.train.lr, float) and recipe.train.lr == 1.0


def test_empty_recipe_gives_the_documented_defaults(tmp_path):
    recipe = load_recipe(write_toml(tmp_path / "empty.toml", {}))
    assert (recipe.model.name, recipe.model.dtype) == ("gpt2", "auto")  # bf16 on a CUDA GPU with bf16, else fp32
    assert (recipe.lora.rank, recipe.lora.alpha, recipe.lora.dropout, recipe.lora.targets) == (
        8,
        16.0,
        0.05,
        ["q", "v"],
    )
    data = recipe.data
    assert (data.task, data.text_field, data.label_field) == ("classification", "sentence", "label")
    assert (data.train_split, data.eval_split, data.max_length, data.config) == ("train", "validation", 128, None)
    train = recipe.train
    assert (train.max_steps, train.epochs, train.batch_size, train.grad_accum) == (0, 1, 16, 1)
    assert (train.lr, train.warmup_steps, train.schedule, train.weight_decay) == (2e-4, 0, "linear", 0.0)
    assert (train.max_grad_norm, train.seed, train.mixed_precision) == (1.0, 42, "auto")
    assert (train.global_batch, train.parallel) == (0, "ddp")
    assert (train.save_every, train.log_every) == (0, 10)


def test_text_field_defaults_to_text_for_plain_text_and_stays_when_given():
    assert validate({"data": {"task": "text"}}).data.text_field == "text"
    assert validate({"data": {"task": "text", "text_field": "body"}}).data.text_field == "body"
    assert validate({"data": {"task": "classification"}}).data.text_field == "sentence"


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("raw", "named", "suggested"),
    [
        ({"lora": {"rnk": 8}}, "rnk", "'rank'"),
        ({"train": {"batchsize": 8}}, "batchsize", "'batch_size'"),
        ({"data": {"lable_field": "y"}}, "lable_field", "'label_field'"),
        ({"trian": {"lr": 1e-3}}, "trian", "'train'"),
    ],
)
def test_unknown_key_is_named_with_the_closest_valid_one(raw, named, suggested):
    message = error_of(raw)
    assert named in message and f"did you mean {suggested}" in message


def test_unknown_key_far_from_any_lists_the_valid_ones():
    # difflib finds nothing close to "learning_rate" in [train]; the message lists the keys, lr among them.
    message = error_of({"train": {"learning_rate": 1e-3}})
    assert "learning_rate" in message and "lr" in message.split("learning_rate", 1)[1]


def test_unknown_section_lists_the_sections():
    message = error_of({"optimizer": {"name": "adamw"}})
    assert "[optimizer]" in message
    assert all(name in message for name in ("model", "lora", "data", "train", "output"))


# ---------------------------------------------------------------- wrong types and ranges


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"lora": {"rank": "8"}}, "[lora] rank"),
        ({"lora": {"rank": 8.0}}, "[lora] rank"),
        ({"train": {"lr": "fast"}}, "[train] lr"),
        ({"lora": {"targets": "q"}}, "[lora] targets"),
        ({"train": {"max_steps": True}}, "[train] max_steps"),
        ({"data": {"labels": "negative,positive"}}, "[data] labels"),
        ({"model": {"name": 5}}, "[model] name"),
        ({"data": {"source": 5}}, "[data] source"),
        ({"model": "gpt2"}, "model"),
    ],
)
def test_wrong_type_names_the_key_and_the_value(raw, key):
    message = error_of(raw)
    assert key in message and "got" in message


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"lora": {"rank": 0}}, "[lora] rank"),
        ({"lora": {"rank": -4}}, "[lora] rank"),
        ({"lora": {"alpha": 0}}, "[lora] alpha"),
        ({"lora": {"dropout": 1.0}}, "[lora] dropout"),
        ({"lora": {"dropout": -0.1}}, "[lora] dropout"),
        ({"lora": {"targets": []}}, "[lora] targets"),
        ({"train": {"lr": 0}}, "[train] lr"),
        ({"train": {"lr": -1e-3}}, "[train] lr"),
        ({"train": {"batch_size": 0}}, "[train] batch_size"),
        ({"train": {"grad_accum": 0}}, "[train] grad_accum"),
        ({"train": {"epochs": 0}}, "[train] epochs"),
        ({"train": {"log_every": 0}}, "[train] log_every"),
        ({"train": {"max_steps": -1}}, "[train] max_steps"),
        ({"train": {"mixed_precision": "fp8"}}, "[train] mixed_precision"),
        ({"train": {"schedule": "step"}}, "[train] schedule"),
        ({"model": {"dtype": "int8"}}, "[model] dtype"),
        ({"data": {"task": "qa"}}, "[data] task"),
        ({"data": {"max_length": 0}}, "[data] max_length"),
        ({"train": {"label_smoothing": 1.0}}, "[train] label_smoothing"),
        ({"eval": {"num_beams": 0}}, "[eval] num_beams"),
    ],
)
def test_out_of_range_value_names_the_key(raw, key):
    message = error_of(raw)
    value = next(iter(next(iter(raw.values())).values()))
    assert key in message and repr(value) in message


def test_dropout_just_below_one_is_accepted():
    assert validate({"lora": {"dropout": 0.0}}).lora.dropout == 0.0
    assert validate({"lora": {"dropout": 0.99}}).lora.dropout == 0.99


def test_toml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[model]\nname = "gpt2"\n\n[lora]\nrank = = 8\n')
    with pytest.raises(LorafitError, match="line 5") as caught:
        load_recipe(path)
    assert str(path) in str(caught.value)


def test_missing_recipe_file_is_bad_input(tmp_path):
    with pytest.raises(LorafitError, match="does not exist") as caught:
        load_recipe(tmp_path / "nope.toml")
    assert caught.value.exit_code == 2


# ---------------------------------------------------------------- --set


def test_set_reads_numbers_strings_lists_and_booleans(tmp_path):
    path = write_toml(tmp_path / "r.toml", {"train": {"lr": 1e-4}})
    recipe = load_recipe(
        path,
        [
            "train.lr=3e-3",
            "lora.rank=2",
            'lora.targets=["q", "k"]',
            "train.gradient_checkpointing=true",
            "data.template=Q: {text} A:",
            'data.labels=["no", "yes"]',
            'model.dtype="float16"',
            "train.mixed_precision=fp16",  # which fp16 weights need
        ],
    )
    assert recipe.train.lr == 3e-3
    assert recipe.lora.rank == 2
    assert recipe.lora.targets == ["q", "k"]
    assert recipe.train.gradient_checkpointing is True
    assert recipe.data.template == "Q: {text} A:"
    assert recipe.data.labels == ["no", "yes"]
    assert recipe.model.dtype == "float16"


def test_later_set_wins(tmp_path):
    recipe = load_recipe(write_toml(tmp_path / "r.toml", {}), ["lora.rank=2", "lora.rank=6"])
    assert recipe.lora.rank == 6


@pytest.mark.parametrize("item", ["train.lr", "lr=1e-3", "train.lr.x=1", "=1", "train.=1", ".lr=1"])
def test_set_that_is_not_section_key_value_is_refused(tmp_path, item):
    with pytest.raises(LorafitError, match="section.key=value") as caught:
        load_recipe(write_toml(tmp_path / "r.toml", {}), [item])
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("item", "named"),
    [("train.learnin_rate=1e-3", "learnin_rate"), ("bogus.key=1", "[bogus]"), ("lora.rank=eight", "[lora] rank")],
)
def test_set_of_unknown_key_or_bad_value_is_refused(tmp_path, item, named):
    with pytest.raises(LorafitError, match=r"\S") as caught:
        load_recipe(write_toml(tmp_path / "r.toml", {}), [item])
    assert named in str(caught.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("all-linear", ["all-linear"]), ("q,v", ["q", "v"]), ("q, v,", ["q", "v"]), ('["q", "v"]', ["q", "v"])],
)
def test_set_gives_a_list_key_as_comma_separated_words_or_a_toml_list(tmp_path, value, expected):
    recipe = load_recipe(write_toml(tmp_path / "r.toml", {}), [f"lora.targets={value}", f"data.labels={value}"])
    assert recipe.lora.targets == expected and recipe.data.labels == expected


def test_set_of_an_empty_list_key_names_set_and_shows_how_to_write_a_list(tmp_path):
    with pytest.raises(LorafitError) as caught:
        load_recipe(write_toml(tmp_path / "r.toml", {}), ["lora.targets="])
    message = str(caught.value)
    assert message.startswith("--set lora.targets: [lora] targets")
    assert "--set lora.targets=q,v or --set 'lora.targets=[\"q\", \"v\"]'" in message


def test_set_of_a_misspelt_section_is_blamed_on_set_not_on_the_file(tmp_path):
    path = write_toml(tmp_path / "r.toml", {})
    with pytest.raises(LorafitError) as caught:
        load_recipe(path, ["trian.lr=1e-3"])
    assert str(caught.value).startswith("--set trian.lr: unknown key section [trian] (did you mean 'train'?)")
    assert str(path) not in str(caught.value)


# ---------------------------------------------------------------- paths


@pytest.fixture
def layout(tmp_path):
    """recipes/ holding a model folder and a dataset folder; data/ with files; work/ as another cwd."""
    (tmp_path / "recipes" / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "recipes" / "sst2_local").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "work").mkdir()
    return tmp_path


def test_relative_paths_resolve_against_the_recipes_folder(layout, monkeypatch):
    monkeypatch.chdir(layout / "work")
    raw = {
        "model": {"name": "models/tiny"},
        "data": {"source": {"train": "../data/a.jsonl", "validation": "../data/b.jsonl"}},
        "output": {"dir": "../runs/x"},
    }
    recipe = load_recipe(write_toml(layout / "recipes" / "r.toml", raw))
    assert recipe.model.name == str(layout / "recipes" / "models" / "tiny")
    assert recipe.data.source == {
        "train": str(layout / "data" / "a.jsonl"),
        "validation": str(layout / "data" / "b.jsonl"),
    }
    assert recipe.output.dir == str(layout / "runs" / "x")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("../data/train.jsonl", "data/train.jsonl"),
        ("sst2_local", "recipes/sst2_local"),
        ("./sst2_local", "recipes/sst2_local"),
    ],
)
def test_single_data_file_and_dataset_folder_resolve_against_the_recipes_folder(layout, monkeypatch, source, expected):
    monkeypatch.chdir(layout / "work")
    recipe = load_recipe(write_toml(layout / "recipes" / "r.toml", {"data": {"source": source}}))
    assert recipe.data.source == str(layout / expected)


def test_model_path_with_dot_resolves_even_before_it_exists(layout, monkeypatch):
    monkeypatch.chdir(layout / "work")
    recipe = load_recipe(write_toml(layout / "recipes" / "r.toml", {"model": {"name": "./not-yet"}}))
    assert recipe.model.name == str(layout / "recipes" / "not-yet")


def test_hub_ids_stay_as_they_are(layout, monkeypatch):
    monkeypatch.chdir(layout / "work")
    raw = {"model": {"name": "gpt2"}, "data": {"source": "glue", "config": "sst2"}}
    recipe = load_recipe(write_toml(layout / "recipes" / "r.toml", raw), ["lora.rank=2"])
    assert (recipe.model.name, recipe.data.source, recipe.data.config) == ("gpt2", "glue", "sst2")
    org = load_recipe(
        layout / "recipes" / "r.toml", ["model.name=openai-community/gpt2", "data.source=stanfordnlp/sst2"]
    )
    assert (org.model.name, org.data.source) == ("openai-community/gpt2", "stanfordnlp/sst2")


def test_set_paths_resolve_against_the_working_directory(layout, monkeypatch):
    work = layout / "work"
    (work / "mine").mkdir()
    monkeypatch.chdir(work)
    raw = {"model": {"name": "models/tiny"}, "data": {"source": "../data/a.jsonl"}, "output": {"dir": "../runs/x"}}
    recipe = load_recipe(
        write_toml(layout / "recipes" / "r.toml", raw),
        ["model.name=./mine", "data.source=b.jsonl", "output.dir=out/run"],
    )
    assert recipe.model.name == str(work / "mine")
    assert recipe.data.source == str(work / "b.jsonl")
    assert recipe.output.dir == str(work / "out" / "run")


def test_set_of_a_split_table_resolves_each_file_against_the_working_directory(layout, monkeypatch):
    monkeypatch.chdir(layout / "work")
    recipe = load_recipe(
        write_toml(layout / "recipes" / "r.toml", {}), ['data.source={train = "t.jsonl", validation = "v.jsonl"}']
    )
    assert recipe.data.source == {
        "train": str(layout / "work" / "t.jsonl"),
        "validation": str(layout / "work" / "v.jsonl"),
    }


def test_set_of_a_non_path_key_keeps_the_recipes_resolved_paths(layout, monkeypatch):
    monkeypatch.chdir(layout / "work")
    recipe = load_recipe(
        write_toml(layout / "recipes" / "r.toml", {"data": {"source": "../data/a.jsonl"}}), ["train.lr=1e-3"]
    )
    assert recipe.data.source == str(layout / "data" / "a.jsonl")


# ---------------------------------------------------------------- round trip and shipped recipes


def test_recipe_toml_round_trips_to_an_equal_recipe(tmp_path):
    original = load_recipe(write_toml(tmp_path / "a" / "r.toml", DESIGN_RECIPE))
    dumped = tmp_path / "b" / "recipe.toml"
    dumped.parent.mkdir()
    dumped.write_text(recipe_toml(original))
    assert load_recipe(dumped) == original


def test_round_trip_keeps_a_split_table_and_an_unset_config(tmp_path):
    raw = {"data": {"source": {"train": "t.jsonl", "validation": "v.jsonl"}, "task": "text"}, "output": {"dir": "run"}}
    original = load_recipe(write_toml(tmp_path / "r.toml", raw))
    dumped = tmp_path / "elsewhere" / "recipe.toml"
    dumped.parent.mkdir()
    dumped.write_text(recipe_toml(original))
    again = load_recipe(dumped)
    assert again == original and again.data.config is None


@pytest.mark.parametrize(
    ("evaluation", "named"),
    [
        ({"metrics": ["meteor"]}, "[eval] metrics.0: input should be 'bleu', 'chrf', 'rouge_l' or 'exact_match'"),
        ({"metrics": ["bleu", "bleu"]}, "[eval] metrics: name each metric once"),
        ({"stop": ["\n", ""]}, "[eval] stop: a stop string cannot be empty"),
    ],
)
def test_eval_metrics_and_stop_strings_are_checked(evaluation, named):
    assert named in error_of({"data": {"task": "completion"}, "eval": evaluation})


@pytest.mark.parametrize("name", ["tiny-sst2.toml", "gpt2-sst2.toml", "tiny-e2e.toml", "gpt2-e2e.toml"])
def test_shipped_recipes_validate_and_round_trip(name, tmp_path):
    recipe = load_recipe(REPO / "recipes" / name)
    assert isinstance(recipe, Recipe)
    (tmp_path / "recipe.toml").write_text(recipe_toml(recipe))
    assert load_recipe(tmp_path / "recipe.toml") == recipe


def test_tiny_recipe_points_at_the_shipped_model_and_data():
    recipe = load_recipe(REPO / "recipes" / "tiny-sst2.toml")
    assert Path(recipe.model.name) == REPO / "data" / "tiny-gpt2"
    assert (Path(recipe.model.name) / "config.json").is_file()
    assert set(recipe.data.source) == {recipe.data.train_split, recipe.data.eval_split}
    assert all(Path(file).is_file() for file in recipe.data.source.values())
    assert Path(recipe.output.dir) == REPO / "runs" / "tiny-sst2"


def test_hub_recipe_keeps_hub_ids():
    recipe = load_recipe(REPO / "recipes" / "gpt2-sst2.toml")
    assert (recipe.model.name, recipe.data.source, recipe.data.config) == ("gpt2", "glue", "sst2")
    assert Path(recipe.output.dir) == REPO / "runs" / "gpt2-sst2"


def test_lists_and_globs_of_files_resolve_against_the_recipes_folder(tmp_path):
    folder = tmp_path / "recipes"
    recipe = load_recipe(write_toml(folder / "r.toml", {"data": {"source": ["a.jsonl", "../shards/*.jsonl"]}}))
    assert recipe.data.source == [str(folder / "a.jsonl"), str(tmp_path / "shards" / "*.jsonl")]
    split = {"train": ["a.jsonl", "b.jsonl"], "validation": "c.jsonl"}
    recipe = load_recipe(write_toml(folder / "s.toml", {"data": {"source": split}}))
    assert recipe.data.source == {"train": [str(folder / "a.jsonl"), str(folder / "b.jsonl")],
                                  "validation": str(folder / "c.jsonl")}


# ---------------------------------------------------------------- keys valid alone that together mean nothing


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"model": {"dtype": "float16"}}, "[model] dtype = 'float16'"),
        ({"train": {"keep_best": True}}, "[train] keep_best"),
        ({"data": {"task": "text", "text_field": "text", "max_length": 8, "stride": 7}}, "[data] stride = 7"),
        ({"data": {"stride": 4}}, "[data] stride windows long documents of task = 'text' only"),
        ({"train": {"shard_size": 2}}, "[train] shard_size groups processes for parallel = 'hsdp' only"),
        ({"train": {"shard_size": 2, "parallel": "fsdp"}}, "parallel = 'fsdp' does not read it"),
        ({"data": {"task": "chat", "template": "Q: {text}"}}, "[data] template is not used by task = 'chat'"),
        ({"data": {"source": "notes/*.txt"}}, "[data] source has .txt files"),
        ({"data": {"source": "rows.jsonl", "streaming": True}}, "[data] streaming draws rows from a hub data set"),
        ({"data": {"streaming": True}}, "[data] streaming has no end"),
        ({"data": {"streaming": True, "eval_fraction": 0.1}, "train": {"max_steps": 5}}, "[data] eval_fraction"),
        ({"data": {"streaming": True, "eval_split": "validation"}, "train": {"max_steps": 5}}, "max_eval_examples"),
    ],
)
def test_keys_valid_alone_that_together_mean_nothing_are_refused_naming_them(raw, named):
    assert named in error_of(raw)


def test_hsdp_reads_shard_size_and_text_reads_stride():
    validate({"train": {"parallel": "hsdp", "shard_size": 2}})
    validate({"data": {"task": "text", "text_field": "text", "max_length": 8, "stride": 2}})
