"""Stage 2: TFPO training of the doctor (loss, config, trainer, CLI)."""
