"""The three splits of a category: training, validation (held-out normal training images) and test."""

from __future__ import annotations

from adps import paths
from adps.config import Params
from adps.data import layout
from adps.data.datasets import split_train_val
from adps.errors import AdpsError


def check_category(params: Params, category: str) -> None:
    """Only the configured categories are worked on (a name never reaches the file system unchecked)."""
    if category not in params.data.categories:
        raise AdpsError(f"unknown category '{category}'; data.categories has: {', '.join(params.data.categories)}")


def category_splits(params: Params, category: str) -> tuple[list, list, list]:
    """(train, validation, test) samples of a category; validation = held-out normal train images."""
    check_category(params, category)
    samples = layout.build_sample_index(paths.category_dir(params, category), category)
    normal_train = [s for s in samples if s.split == "train" and s.label == 0]
    train, val = split_train_val(normal_train, params.data.val_fraction, params.runtime.seed)
    return train, val, [s for s in samples if s.split == "test"]
