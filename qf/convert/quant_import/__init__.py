"""Importers of quantized Hugging Face checkpoints, registered by `quant_method` in
qf.convert.hf_config.QUANT_METHODS (the converter's one dispatch on quantization_config)."""

from __future__ import annotations

from qf.convert.hf_config import QUANT_METHODS
from qf.convert.quant_import.base import Importer, LinearPayload, MemberSource
from qf.convert.quant_import.compressed_tensors import IMPORTER as _CT
from qf.convert.quant_import.gptq import AWQ as _AWQ
from qf.convert.quant_import.gptq import GPTQ as _GPTQ
from qf.convert.quant_import.hf_fp8 import IMPORTER as _FP8

for _imp in (_CT, _GPTQ, _AWQ, _FP8):
    QUANT_METHODS[_imp.method] = _imp

__all__ = ["Importer", "LinearPayload", "MemberSource", "QUANT_METHODS"]
