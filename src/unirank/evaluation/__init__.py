"""Per-task offline evaluation: metrics, the ranking path (full catalogue, the protocol's filtering), baselines."""
