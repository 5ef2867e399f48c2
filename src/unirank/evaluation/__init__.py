"""Per-task offline evaluation: metrics, the ranking path, baselines, reports, alignment tax, cold start."""
