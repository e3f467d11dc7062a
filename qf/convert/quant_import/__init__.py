"""Importers of quantized Hugging Face checkpoints, registered by `quant_method` in
qf.convert.hf_config.QUANT_METHODS (the converter's one dispatch on quantization_config)."""

from __future__ import annotations

from qf.convert.hf_config import QUANT_METHODS
from qf.convert.quant_import.base import Importer, LinearPayload, MemberSource
from qf.convert.quant_import.compressed_tensors import IMPORTER as _CT

for _imp in (_CT,):
    QUANT_METHODS[_imp.method] = _imp

__all__ = ["Importer", "LinearPayload", "MemberSource", "QUANT_METHODS"]
