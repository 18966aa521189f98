"""The positive-sentiment doctor for the real model, kept in the package.

It was trained by the project's own commands (``python -m llmdoctor_train.real.build_doctor``): a LoRA
doctor on SmolLM2-135M-Instruct's weights. A LoRA doctor names the base weights it applies to; the
packaged copy names the model only (no machine path), and :func:`positive_doctor` writes a ready
copy beside the converted patient, its manifest naming that patient's folder.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from llmdoctor_train.real.smollm2 import NAME

PACKAGED = Path(__file__).parent / "doctors" / "positive"
FILES = ("llmdoctor.json", "adapter_config.json", "adapter_model.safetensors", "value_head.safetensors",
         "README.md", "training.json")


def _with_base(folder: Path, base: str) -> None:
    """Points the manifest and the adapter config of the doctor in ``folder`` at ``base``."""
    for name, key in (("llmdoctor.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        path = folder / name
        data = json.loads(path.read_text())
        data[key] = base
        path.write_text(json.dumps(data, indent=2) + "\n")


def install_doctor(trained: str | Path, dest: str | Path = PACKAGED, training: dict | None = None) -> Path:
    """Copies the LoRA doctor at ``trained`` into ``dest`` (the package by default) without its tokenizer
    files (the patient's are used) and with its base named by the model's name only; ``training`` (the
    commands, settings and timings that made it) goes to ``training.json``."""
    trained, dest = Path(trained), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in FILES:
        if (trained / name).is_file():
            shutil.copy2(trained / name, dest / name)
    _with_base(dest, NAME)
    card = dest / "README.md"
    if card.is_file():  # the model card names the folders it was trained in: keep only their last parts
        base = json.loads((trained / "llmdoctor.json").read_text())["base_model"]
        text = card.read_text().replace(str(base), NAME).replace(str(trained.resolve()), dest.name)
        card.write_text(re.sub(r"(?<![\w.:/])(?:/[\w.\-]+)+/([\w.\-]+)", r"\1", text))
    if training is not None:
        (dest / "training.json").write_text(json.dumps(training, indent=1) + "\n")
    return dest


def positive_doctor(patient: str | Path, packaged: str | Path = PACKAGED) -> Path:
    """A loadable copy of the packaged doctor for the patient folder ``patient`` (written once beside it,
    in ``<patient's folder>-doctors/positive``, and refreshed when the packaged one changes)."""
    packaged, patient = Path(packaged), Path(patient).resolve()
    if not (packaged / "llmdoctor.json").is_file():
        raise FileNotFoundError(f"no packaged doctor in {packaged}: rebuild it with "
                                "`python -m llmdoctor_train.real.build_doctor --workdir WORK --install`")
    dest = patient.parent / f"{patient.name}-doctors" / "positive"
    stamp = json.dumps({n: hashlib.sha256((packaged / n).read_bytes()).hexdigest()
                        for n in FILES if (packaged / n).is_file()}, sort_keys=True)
    if (dest / ".stamp").is_file() and (dest / ".stamp").read_text() == stamp:
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(packaged, tmp)
    _with_base(tmp, str(patient))
    (tmp / ".stamp").write_text(stamp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
