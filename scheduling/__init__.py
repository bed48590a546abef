"""Cost models and core-allocation planners for edge KD (the edge-KD paper)."""
