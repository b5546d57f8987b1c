"""hellbender: fine-tune open LLMs from one YAML file, correct by construction."""

__version__ = "0.1.0"
