"""Cost models and core-allocation planners for edge KD (paper 002)."""
