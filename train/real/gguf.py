"""GGUF files from the package index as plain Hugging Face folders: transformers dequantizes a GGUF
(``gguf_file=``) but refuses to save a GGUF-quantized model, so the weights are loaded into a plain
float32 model built from the same config, which saves as usual."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def dequantize_gguf(gguf: Path):
    """``(model, tokenizer)``: the GGUF file's weights in a plain float32 model, and its tokenizer
    (with the chat template the file carries)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    for key in ("quantization_config", "_model_name_or_path"):
        config.__dict__.pop(key, None)
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=False)  # a tied head is absent from the file
    plain.tie_weights()
    return plain, tokenizer


@contextmanager
def atomic_folder(folder: Path):
    """Yields an empty folder beside ``folder`` that replaces it once the block ends without an error
    (an interrupted conversion never leaves a half-written ``folder``)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tmp.chmod(0o755)
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
