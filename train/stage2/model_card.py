"""The model card (``README.md``) written into every doctor checkpoint: TRL's card, filled in by
``trl.trainer.utils.generate_model_card`` as TRL's trainers fill theirs, plus how to serve the doctor."""

from __future__ import annotations

import os
from pathlib import Path

SERVING = """
## Serving this doctor with llmdoctor-vllm

This folder is a doctor checkpoint ({kind}: weights, value head `value_head.safetensors` and the
manifest `llmdoctor.json`). It steers a frozen patient that shares its tokenizer, in vLLM:

```bash
vllm serve PATIENT --logits-processors llmdoctor_vllm:LLMDoctor \\
    --additional-config '{{"llmdoctor": {{"doctors": {{"{name}": "{path}"}}}}}}'
```

and each request opts in with `vllm_xargs={{"llmdoctor_beta": 0.8}}`. Trained with {method}
(loss_type `{loss_type}`{details}) for: {trained_for}.
"""

PAPERS = {"tfpo": "TFPO (LLMdoctor's token-level flow-guided preference optimisation)",
          "genarm": "GenARM's trajectory loss (the LLMdoctor baseline)"}


def _details(args) -> str:
    if args.loss_type != "tfpo":
        return f", beta_r {args.genarm_beta}"
    return f", subtrajectories '{args.subtb_weighting}', lam {args.lam}, gamma {args.gamma}"


def write_model_card(output_dir: str, args, *, base_model: str | None, dataset_name: str | None = None,
                     hub_model_id: str | None = None) -> Path:
    """Writes ``output_dir/README.md`` for a doctor trained with ``args`` (a ``TFPOConfig``)."""
    from trl.trainer.utils import generate_model_card

    folder = Path(output_dir)
    hub_base = base_model if base_model and not os.path.isdir(base_model) else None  # only Hub ids are links
    local_data = dataset_name and os.path.exists(dataset_name)
    card = generate_model_card(
        base_model=hub_base, model_name=folder.name, hub_model_id=hub_model_id or folder.name,
        dataset_name=None if local_data else dataset_name, tags=["llmdoctor", args.loss_type, "trl"],
        wandb_url=None, trackio_url=None, trainer_name=PAPERS.get(args.loss_type, args.loss_type))
    kind = "a LoRA adapter on " + base_model if base_model and (folder / "adapter_config.json").exists() else "full"
    card.text += SERVING.format(kind=kind, name=args.trained_for or "doctor", path=folder.resolve(),
                                method=PAPERS.get(args.loss_type, args.loss_type), loss_type=args.loss_type,
                                details=_details(args), trained_for=args.trained_for or "(not given)")
    path = folder / "README.md"
    card.save(str(path))
    return path
