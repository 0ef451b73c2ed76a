"""The registry of variants: the recipe's choices are its entries, every entry converts to and from peft, and
every layer of every entry has the protocol the rest of lorafit relies on."""

from __future__ import annotations

from typing import get_args

import pytest
from conftest import tiny_model

from lorafit.adapter.convert import FORMS
from lorafit.adapter.save import peft_config
from lorafit.lora.variants import EMBEDDING, INITS, VARIANTS, from_peft_config, layer_variant
from lorafit.model.inject import inject_lora
from lorafit.recipe import LoraSection, VariantName


def test_the_recipes_variants_and_starts_are_the_registrys():
    assert set(get_args(VariantName)) == set(VARIANTS)
    assert set(get_args(LoraSection.model_fields["init"].annotation)) == set(INITS)


def test_every_entry_has_its_peft_conversion():
    assert set(FORMS) == {*VARIANTS.values(), EMBEDDING}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_an_adapter_config_names_the_variant_it_loads_as(name):
    """The flags a saved adapter's config carries lead back to the variant it loads as (AdaLoRA's: plain LoRA)."""
    model = tiny_model("llama")
    layers = inject_lora(model, ["q", "v"], 2, 4.0, variant=name)
    assert all(layer_variant(layer) is VARIANTS[name] for layer in layers.values())
    variant = VARIANTS[name]
    assert from_peft_config(peft_config(model, layers, "tiny")).name == (variant.saved_as or name)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_layer_has_the_shared_protocol(name):
    targets = ["embed", "q"] if VARIANTS[name].embeddings else ["q"]
    for layer in inject_lora(tiny_model("llama"), targets, 2, 4.0, variant=name).values():
        d_out, d_in = layer.weight_shape
        assert layer.delta_weight().shape == (d_out, d_in)
        assert layer.max_rank == min(d_out, d_in)
        assert layer.lora_params == sum(p.numel() for p in layer.parameters() if p.requires_grad)
        assert (layer.rank, layer.alpha, layer.scaling) == (2, 4.0, 2.0)
