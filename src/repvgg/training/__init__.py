"""Training: the engine every job plugs into, the classification task, data, optimizer, evaluation, ablation."""
