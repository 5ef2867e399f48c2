"""Dataset loaders: every format produces the same `InteractionData`."""
from unirank.data.datasets.catalog import DatasetError, InteractionData
from unirank.data.datasets.load import load_dataset

__all__ = ["DatasetError", "InteractionData", "load_dataset"]
