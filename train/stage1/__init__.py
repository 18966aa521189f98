"""Stage 1: token-level rewards from the frozen patient (formulas, data, scoring, pipeline, CLI)."""
