"""A Hugging Face checkpoint's tensors: one or many safetensors shards, cross-checked against the index."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qf.convert.hf_config import read_json
from qf.convert.safetensors_io import SafetensorsFile, TensorEntry
from qf.format.errors import ConvertError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_GLOB = "model*.safetensors"
MAX_LISTED = 10  # names quoted in one error message


def _names(items: list[str]) -> str:
    """A short, sorted list for an error message."""
    items = sorted(items)
    more = f" ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def _read_index(model_dir: Path) -> dict[str, str]:
    """weight_map of the index: tensor name -> shard file name (a plain name inside model_dir)."""
    path = model_dir / INDEX_NAME
    wm = read_json(path, INDEX_NAME).get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise ConvertError(f"{path}: 'weight_map' must map tensor names to shard file names")
    bad = [v for v in set(wm.values()) if Path(v).name != v or v in (".", "..")]
    if bad:
        raise ConvertError(f"{path}: shard names must be plain file names in the folder: {_names(bad)}")
    return wm


class Checkpoint:
    """Tensor name -> (shard, entry) over every shard of a checkpoint folder."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / INDEX_NAME
        weight_map = _read_index(self.dir) if index.is_file() else None
        if weight_map is not None:
            shard_names = sorted(set(weight_map.values()))
        elif (self.dir / SINGLE_NAME).is_file():
            shard_names = [SINGLE_NAME]
        else:
            shard_names = sorted(p.name for p in self.dir.glob(SHARD_GLOB))
        if not shard_names:
            raise ConvertError(f"{self.dir}: no {SINGLE_NAME}, {INDEX_NAME} or {SHARD_GLOB} files")
        missing = [s for s in shard_names if not (self.dir / s).is_file()]
        if missing:
            raise ConvertError(f"{index}: missing shard files: {_names(missing)}")
        self.shards: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        try:
            for s in shard_names:
                self._add_shard(s)
            if weight_map is not None:
                self._check_index(weight_map, index)
        except BaseException:
            self.close()
            raise

    def _add_shard(self, shard: str) -> None:
        """Open one shard and record its tensors; a name already seen elsewhere is an error."""
        f = SafetensorsFile(self.dir / shard)
        self.shards[shard] = f
        dup = [n for n in f.keys() if n in self._where]
        if dup:
            first = self._where[dup[0]]
            raise ConvertError(f"{self.dir}: tensors in two shards ({first} and {shard}): {_names(dup)}")
        for n in f.keys():
            self._where[n] = shard

    def _check_index(self, weight_map: dict[str, str], index: Path) -> None:
        """The index and the shards must agree name for name and shard for shard."""
        absent = [n for n in weight_map if n not in self._where]
        if absent:
            raise ConvertError(f"{index}: tensors listed in the index are missing from the shards: {_names(absent)}")
        extra = [n for n in self._where if n not in weight_map]
        if extra:
            raise ConvertError(f"{index}: shard tensors not listed in the index: {_names(extra)}")
        moved = [f"{n} (index: {weight_map[n]}, found in {self._where[n]})"
                 for n in weight_map if weight_map[n] != self._where[n]]
        if moved:
            raise ConvertError(f"{index}: tensors not in the shard the index names: {_names(moved)}")

    def names(self) -> list[str]:
        """All tensor names, shard by shard, header order within a shard."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def entry(self, name: str) -> TensorEntry:
        """Header entry (dtype, numpy shape, byte range) of a tensor."""
        return self._file(name).entry(name)

    def _file(self, name: str) -> SafetensorsFile:
        """The shard holding a tensor."""
        try:
            return self.shards[self._where[name]]
        except KeyError:
            raise ConvertError(f"{self.dir}: checkpoint has no tensor {name!r}") from None

    def to_f32(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """A tensor (or rows on axis 0) as f32: a view of the mapped file when stored F32, else a copy."""
        return self._file(name).to_f32(name, rows)

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy view in the stored dtype."""
        return self._file(name).raw(name)

    def release(self, name: str) -> None:
        """Let the pages of a tensor we are done with leave our resident set."""
        self._file(name).release(name)

    def close(self) -> None:
        """Unmap every shard."""
        for f in self.shards.values():
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
