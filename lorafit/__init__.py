"""lorafit: LoRA fine-tuning for Hugging Face causal language models."""

__version__ = "0.1.0"
