"""On-disk format: GGUF v3 reader (mmap, validated) and streaming writer."""

from qf.format.errors import ChecksumError, FormatError
from qf.format.ggml_types import GGMLType
from qf.format.reader import GGUFFile, Metadata, MetadataLimits, TensorInfo, open_gguf
from qf.format.values import GGUFValueType
from qf.format.writer import QFWriter

__all__ = [
    "ChecksumError", "FormatError", "GGMLType", "GGUFFile", "GGUFValueType", "Metadata",
    "MetadataLimits", "QFWriter", "TensorInfo", "open_gguf",
]
