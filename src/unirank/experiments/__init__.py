"""Experiments that train or read checkpoints and write reports: the leaderboard benchmark, the
alignment tax, cold start and the per-run evaluation report."""
