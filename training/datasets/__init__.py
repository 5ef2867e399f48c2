"""Dataset loaders: every format produces the same `InteractionData`."""
from unirank.training.datasets.catalog import DatasetError, InteractionData, load_dataset

__all__ = ["DatasetError", "InteractionData", "load_dataset"]
