"""Training: the procedural dataset, the fidelity metric, the training frame, trainers, LoRA,
evaluation."""
