"""Training-side code: Stage 1 token rewards and Stage 2 TFPO training of the doctor."""
