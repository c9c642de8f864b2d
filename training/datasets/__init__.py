"""Labelled ECG data sets for training and evaluation (PTB-XL first)."""

from .ptbxl import (
    SUPERCLASSES,
    TEST_FOLDS,
    TRAIN_FOLDS,
    VAL_FOLDS,
    PtbxlData,
    check_patient_disjoint,
    load_ptbxl,
)

__all__ = [
    "SUPERCLASSES",
    "TRAIN_FOLDS",
    "VAL_FOLDS",
    "TEST_FOLDS",
    "PtbxlData",
    "load_ptbxl",
    "check_patient_disjoint",
]
