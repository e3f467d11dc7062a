"""config.json of an HF checkpoint: load it, check the keys an architecture needs, reject what we cannot convert."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from qf.convert.json_fields import Fields, read_json
from qf.format.errors import ConvertError

__all__ = ["CONFIG_NAME", "QUANT_METHODS", "architecture_of", "check_quantization", "load_config", "positive_int",
           "read_json", "require_keys"]

CONFIG_NAME = "config.json"

# quant_method -> importer of its checkpoints (qf.convert.quant_import registers them: an object with
# .check(quantization_config, path) and .scan(checkpoint, quantization_config, path)); anything else is
# rejected with this list in the message.
QUANT_METHODS: dict[str, Any] = {}


def load_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder."""
    return read_json(Path(model_dir) / CONFIG_NAME, CONFIG_NAME)


def architecture_of(cfg: dict[str, Any], path: Path, supported: Iterable[str]) -> str:
    """The single entry of `architectures`, which must be one we support."""
    supported = sorted(supported)
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        raise ConvertError(f"{path}: 'architectures' must list exactly one architecture (got {archs!r}); "
                           f"supported: {', '.join(supported)}")
    if archs[0] not in supported:
        raise ConvertError(f"{path}: unsupported architecture {archs[0]!r}; supported: {', '.join(supported)}")
    return archs[0]


def check_quantization(cfg: dict[str, Any], path: Path) -> None:
    """A quantization_config must belong to a registered importer; otherwise say what is supported."""
    qc = cfg.get("quantization_config")
    if qc is None:
        return
    supported = ", ".join(["unquantized F32/F16/BF16 checkpoints", *sorted(QUANT_METHODS)])
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    detail = ""
    if isinstance(qc, dict):
        fmt = qc.get("checkpoint_format") or qc.get("format") or qc.get("version")
        detail = f" (format {fmt!r})" if fmt else ""
    if method not in QUANT_METHODS:
        raise ConvertError(f"{path}: unsupported quantization_config quant_method {method!r}{detail}; "
                           f"supported: {supported}")
    try:
        QUANT_METHODS[method].check(qc, path)
    except ConvertError as e:  # the importer's reason, then what is read at all
        raise ConvertError(f"{e}; supported: {supported}") from None


def require_keys(cfg: dict[str, Any], keys: Iterable[str], arch: str, path: Path) -> None:
    """Every key an architecture needs is present, else one error listing all missing keys."""
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ConvertError(f"{path}: config.json for {arch} is missing required keys: {', '.join(missing)}")


def positive_int(cfg: dict[str, Any], key: str, path: Path) -> int:
    """cfg[key] as an int > 0, or a ConvertError naming the key."""
    return Fields(cfg, path).int(key, lo=1)
