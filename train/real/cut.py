"""A smaller doctor cut from the patient: its first ``K`` decoder layers, its final norm and its (tied)
output head, saved as a plain HF folder with the patient's tokenizer. It starts as a shallow
language model sharing the patient's vocabulary; trained in full with ``llmdoctor train --use_peft false``,
its reference for the delta rule is this folder, its own starting weights.

    python -m llmdoctor_train.real.cut --layers 8 --output doctors/cut8     # from `llmdoctor smollm2`
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cut_layers(patient: str, layers: int, output: str | Path) -> Path:
    """Saves the patient's first ``layers`` decoder layers (with embeddings, final norm and head) to ``output``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(patient, dtype=torch.float32)
    total = model.config.num_hidden_layers
    if not 0 < layers <= total:
        raise ValueError(f"cut_layers: layers must be in 1..{total}, got {layers}")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    output = Path(output)
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(patient).save_pretrained(output)
    return output


def main(argv=None) -> None:
    """``python -m llmdoctor_train.real.cut``."""
    p = argparse.ArgumentParser(prog="python -m llmdoctor_train.real.cut", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder to write the cut model to")
    p.add_argument("--layers", type=int, default=8, help="decoder layers to keep (default: 8)")
    p.add_argument("--patient", help="the patient folder (default: SmolLM2-135M-Instruct from `llmdoctor smollm2`)")
    args = p.parse_args(argv)
    if args.patient is None:
        from llmdoctor_train.real.smollm2 import MissingModelError, smollm2_path

        try:
            args.patient = str(smollm2_path())
        except MissingModelError as e:
            raise SystemExit(str(e)) from None
    print(cut_layers(args.patient, args.layers, args.output))


if __name__ == "__main__":
    main()
