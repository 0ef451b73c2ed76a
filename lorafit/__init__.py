"""lorafit: LoRA fine-tuning for Hugging Face causal language models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lorafit")  # pyproject.toml is the one place the version is written
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
