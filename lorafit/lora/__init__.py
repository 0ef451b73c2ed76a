"""The LoRA math, torch only and readable alone: the layers of each variant, their starts, keyed dropout."""
