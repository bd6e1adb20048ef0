"""Two-stage training: asymmetric distillation, then PSM through the WMB; checkpoints and resume."""
