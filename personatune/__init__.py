"""personatune: the ML core of the persona fine-tuning pipeline.

Plain Python, no Prefect: data validation, tokenization, the QLoRA model, training, evaluation and the
adapter bundle. `tasks/` wraps these functions for Prefect; a benchmark or notebook can call them directly.
"""
from personatune.config import EMBEDDED_MODEL, ConfigError, FinetuneConfig

__all__ = ["EMBEDDED_MODEL", "ConfigError", "FinetuneConfig"]
