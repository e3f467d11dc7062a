"""Weight formats: how one linear weight of a `.qf` file is stored, keyed by scheme (docs/qf-extensions.md).

`ggml:<type>` is one tensor of one ggml type (every weight GGUF itself defines). A *payload* format
stores one logical weight `<base>.weight` [n_out, n_in] as several member tensors `<base>.<suffix>` plus one
entry in the `qf.payload.*` key arrays. Each format declares its members (storage types, shapes), parses and
prints its scheme string, checks a file's members, slices output rows, and dequantizes (numpy, the reference
the kernels are tested against). Kernels live with each backend (qf.runtime.kernels.*_payload), keyed by the
same scheme name.
"""

from __future__ import annotations

from qf.quant.formats.base import (
    PAYLOAD_SOURCE_KEY, PAYLOAD_SCHEMES_KEY, PAYLOAD_TENSORS_KEY, Payload, PayloadDecl, WeightFormat,
    fold_payloads, format_of, member_name, payload_kv, registered_schemes,
)
from qf.quant.formats import fp8, intgroup  # noqa: F401  (register)

__all__ = ["PAYLOAD_SCHEMES_KEY", "PAYLOAD_SOURCE_KEY", "PAYLOAD_TENSORS_KEY", "Payload", "PayloadDecl",
           "WeightFormat", "fold_payloads", "format_of", "member_name", "payload_kv", "registered_schemes"]
