"""The model card (``README.md``) written into every doctor checkpoint, with ``huggingface_hub``'s
``ModelCard`` as TRL's trainers write theirs (card metadata, training procedure, framework
versions, citations), but saying what a doctor is and how to serve it: TRL's own template
offers ``pipeline("text-generation")`` as the quick start, which is not how a doctor is used."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}: an LLMdoctor doctor

A doctor model of [LLMdoctor](https://arxiv.org/abs/2601.10416), for the llmdoctor-vllm plugin: it
steers a frozen *patient* LLM that shares its tokenizer, token by token, at decoding time (it is not
a chat model on its own).
It is {{ kind }}{% if base_model %} on `{{ base_model }}`{% endif %}, with a value head
(`value_head.safetensors`) and the manifest `llmdoctor.json` (tokenizer fingerprint, reference).

## Serving it

```bash
vllm serve PATIENT --logits-processors llmdoctor_vllm:GuidanceProcessor \\
    --additional-config '{"llmdoctor": {"doctors": {"{{ name }}": "{{ path }}"}}}'
```

Each request opts in with `vllm_xargs={"llmdoctor_beta": 0.8}` (`llmdoctor_rule`: `product` or `delta`).

## Training procedure

Trained with `llmdoctor train` ({{ method }}; loss_type `{{ loss_type }}`{{ details }}) for
{{ global_step }} steps on Stage 1 token rewards{% if dataset %} from `{{ dataset }}`{% endif %},
as a `transformers.Trainer` in TRL's style. Trained for: {{ trained_for }}.

### Framework versions

{% for name, v in versions %}- {{ name }}: {{ v }}
{% endfor %}
## Citations

```bibtex
@software{vonwerra2020trl,
  title  = {{ '{{' }}TRL: Transformers Reinforcement Learning{{ '}}' }},
  author = {von Werra, Leandro and others},
  url    = {https://github.com/huggingface/trl},
  year   = {2020}
}
```
"""

METHODS = {"tfpo": "TFPO: subtrajectory balance + value discrimination", "genarm": "GenARM's trajectory loss"}
PACKAGES = ("llmdoctor-vllm", "trl", "transformers", "peft", "torch", "datasets", "tokenizers")


def _versions() -> list[tuple[str, str]]:
    out = []
    for name in PACKAGES:
        try:
            out.append((name, version(name)))
        except PackageNotFoundError:
            continue
    return out


def _details(args) -> str:
    if args.loss_type != "tfpo":
        return f", beta_r {args.genarm_beta}"
    return (f", subtrajectories `{args.subtb_weighting}`, value_loss_weight {args.value_loss_weight}, "
            f"gamma {args.gamma}, reference_weight {args.reference_weight}")


def write_model_card(output_dir: str, args, *, base_model: str | None, global_step: int = 0,
                     dataset_name: str | None = None) -> Path:
    """Writes ``output_dir/README.md`` for a doctor trained with ``args`` (a ``TFPOConfig``)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(output_dir)
    lora = (folder / "adapter_config.json").is_file()
    hub_base = base_model if base_model and not os.path.isdir(base_model) else None  # only Hub ids in metadata
    data = ModelCardData(base_model=hub_base, library_name="peft" if lora else "transformers",
                         tags=["llmdoctor", "llmdoctor-doctor", args.loss_type, "trl", "generated_from_trainer"],
                         model_name=folder.name)
    card = ModelCard.from_template(
        data, template_str=TEMPLATE, model_name=folder.name, kind="a LoRA adapter" if lora else "a full model",
        base_model=base_model if lora else None, name=args.trained_for or "doctor", path=folder.resolve(),
        method=METHODS.get(args.loss_type, args.loss_type), loss_type=args.loss_type, details=_details(args),
        global_step=global_step, dataset=dataset_name, trained_for=args.trained_for or "(not given)",
        versions=_versions())
    path = folder / "README.md"
    card.save(str(path))
    return path
