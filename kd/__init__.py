"""AFLKD distillation: losses, freezing, trainers, datasets, incremental updates (issue 3)."""
