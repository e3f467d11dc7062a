"""Write llama.cpp imatrix files (GGUF and legacy .dat) for tests, from importance sums and counts."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from qf.format import GGMLType, QFWriter
from qf.format.values import GGUFValueType as V


def write_dat(path: Path, entries: dict[str, tuple[int, np.ndarray]], chunks: int | None = 3,
              dataset: str | None = "calib.txt") -> Path:
    """Legacy .dat: {name: (ncall, values)}; values are mean(x^2) * ncall as llama-imatrix stores them."""
    out = bytearray(struct.pack("<i", len(entries)))
    for name, (ncall, v) in entries.items():
        raw = name.encode()
        v = np.asarray(v, "<f4").reshape(-1)
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, v.size) + v.tobytes()
    if chunks is not None:
        out += struct.pack("<i", chunks)
        if dataset is not None:
            out += struct.pack("<i", len(dataset.encode())) + dataset.encode()
    path.write_bytes(bytes(out))
    return path


def write_gguf(path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]], chunks: int = 3,
               datasets: tuple[str, ...] = ("calib.txt",), meta: bool = True) -> Path:
    """GGUF imatrix: {name: (sums f32 [n_mat, n_in], counts f32 [n_mat])}."""
    with QFWriter(path, checksums=False) as w:
        w.add_kv("general.type", "imatrix")
        if meta:
            w.add_kv("imatrix.datasets", list(datasets), V.ARRAY, elem_type=V.STRING)
            w.add_kv("imatrix.chunk_count", chunks, V.UINT32)
            w.add_kv("imatrix.chunk_size", 512, V.UINT32)
        for name, (sums, counts) in entries.items():
            sums = np.asarray(sums, np.float32).reshape(len(counts), -1)
            w.add_tensor_info(f"{name}.in_sum2", ne=(sums.shape[1], sums.shape[0]), type=GGMLType.F32)
            w.add_tensor_info(f"{name}.counts", ne=(1, len(counts)), type=GGMLType.F32)
        for name, (sums, counts) in entries.items():
            w.write_tensor(f"{name}.in_sum2", np.asarray(sums, np.float32).reshape(len(counts), -1))
            w.write_tensor(f"{name}.counts", np.asarray(counts, np.float32).reshape(len(counts), 1))
    return path


def random_imatrix(path: Path, model: Path, seed: int = 0, fmt: str = "gguf") -> Path:
    """An imatrix for every 2-D weight of a GGUF model but token_embd, with lognormal importance."""
    from qf.format.reader import open_gguf

    rng = np.random.default_rng(seed)
    with open_gguf(model) as f:
        shapes = {n: t.ne for n, t in f.tensors.items() if len(t.ne) == 2 and n != "token_embd.weight"}
    if fmt == "gguf":
        return write_gguf(path, {n: (rng.lognormal(0, 1.5, (1, ne[0])) * 40, np.array([40.0]))
                                 for n, ne in shapes.items()})
    return write_dat(path, {n: (40, rng.lognormal(0, 1.5, ne[0]) * 40) for n, ne in shapes.items()})
