"""The LoRA math, torch only and readable alone: the layers of each variant, their starts, keyed dropout, and
the registry (variants.py) of what each variant is, which also states the protocol every layer shares."""
