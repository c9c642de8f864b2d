"""Labelled ECG data sets for training (PTB-XL) and external evaluation (PhysioNet challenge)."""

from ecgbridge.training.datasets.challenge import SNOMED_TO_SUPERCLASS, ChallengeData, is_challenge_dir, load_challenge
from ecgbridge.training.datasets.ptbxl import (
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
    "SNOMED_TO_SUPERCLASS",
    "ChallengeData",
    "is_challenge_dir",
    "load_challenge",
]
