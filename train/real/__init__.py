"""The real model the project is judged on: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file."""

from llmdoctor_train.real.smollm2 import INSTALL_HINT, MissingModelError, materialize_smollm2, smollm2_path

__all__ = ["INSTALL_HINT", "MissingModelError", "materialize_smollm2", "smollm2_path"]
