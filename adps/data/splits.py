"""The three splits of a category: training, validation (held-out normal training images, and a share
of the labelled test defects when ``data.val_defect_fraction`` > 0) and test."""

from __future__ import annotations

from adps import paths
from adps.config import Params
from adps.data import layout
from adps.data.datasets import split_held_out, split_train_val
from adps.errors import AdpsError


def check_category(params: Params, category: str) -> None:
    """Only the configured categories are worked on (a name never reaches the file system unchecked)."""
    if category not in params.data.categories:
        raise AdpsError(f"unknown category '{category}'; data.categories has: {', '.join(params.data.categories)}")


def category_splits(params: Params, category: str) -> tuple[list, list, list]:
    """(train, validation, test) samples of a category.

    Validation: the held-out normal training images (``data.val_fraction``), and, when
    ``data.val_defect_fraction`` > 0, that share of each defect type's test images (seeded): real
    labelled defects, on which the image threshold and the model kind are then chosen.
    """
    check_category(params, category)
    samples = layout.build_sample_index(paths.category_dir(params, category), category)
    normal_train = [s for s in samples if s.split == "train" and s.label == 0]
    train, val = split_train_val(normal_train, params.data.val_fraction, params.runtime.seed)
    test = [s for s in samples if s.split == "test"]
    if params.data.val_defect_fraction > 0:
        held = split_held_out(test, params.data.val_defect_fraction, params.runtime.seed)
        val, test = val + [s for s in test if s in held], [s for s in test if s not in held]
    return train, val, test
