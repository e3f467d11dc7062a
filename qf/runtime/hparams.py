"""Hyperparameters of a llama-family model, read from GGUF metadata and validated.

The rules live in qf.format.hparams, shared with the converter and the requantizer (which check a file with
them before writing it); this module keeps the runtime's import path.
"""

from __future__ import annotations

from qf.format.hparams import LIMITS, ROPE_SCALING_TYPES, HParams, ModelCheckError, hparams_from_metadata

__all__ = ["LIMITS", "ROPE_SCALING_TYPES", "HParams", "ModelCheckError", "hparams_from_metadata"]
