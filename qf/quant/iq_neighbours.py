"""ggml's IQ2 / IQ3 search tables (iq2xs_init_impl / iq3xs_init_impl in ggml-quants.c), built on first use.

For a grid of points (qf.quant.iq_grids.quant_points) ggml indexes every integer point of the search lattice by its
packed levels u (``bits`` per element). ``kmap[u]`` is the grid index when u is a grid point; otherwise it is
``-(offset + 1)`` and ``neighbours[offset]`` holds n followed by the n grid indices nearest to u: all points at the
``nwant`` smallest distinct squared distances, ordered by (distance, index), exactly as ggml's qsort leaves them.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from qf.quant.iq_grids import BITS, kgrid, quant_points

IQ2_KMAP_SIZE = 43692  # iq2xs_init_impl's kmap_size (packed 2-bit levels of 8 elements, all <= 2)
IQ3_KMAP_SIZE = 4096  # iq3xs_init_impl's (3-bit levels of 4 elements)
NWANT = {"iq2xxs": 2, "iq2xs": 2, "iq2s": 1, "iq3xxs": 2, "iq3s": 3}  # distinct distances kept per point
KMAP_SIZE = {"iq2xxs": IQ2_KMAP_SIZE, "iq2xs": IQ2_KMAP_SIZE, "iq2s": IQ2_KMAP_SIZE,
             "iq3xxs": IQ3_KMAP_SIZE, "iq3s": IQ3_KMAP_SIZE}


class SearchTables(NamedTuple):
    """One grid's search tables, as ggml-quants.c keeps them."""

    points: np.ndarray  # int8 [n, dims]: grid point k = 2 * level + 1 per element
    kmap: np.ndarray  # int32 [kmap_size]: grid index, or -(offset + 1) into neighbours
    neighbours: np.ndarray  # uint16 [m]: at each offset a count n, then n grid indices


@njit(cache=True)
def _distances(u, points, bits, d2):
    """Squared distances of lattice point u (packed levels) to every grid point, into d2: int32 [n]."""
    dims = points.shape[1]
    mask = (1 << bits) - 1
    for j in range(points.shape[0]):
        s = 0
        for k in range(dims):
            diff = np.int32(points[j, k]) - (2 * ((u >> (bits * k)) & mask) + 1)
            s += diff * diff
        d2[j] = s


@njit(cache=True)
def _threshold(d2, nwant):
    """The nwant-th smallest distinct value of d2 (or the largest when there are fewer)."""
    t = -1
    for _ in range(nwant):
        best = np.int64(1) << 62
        for j in range(d2.shape[0]):
            if d2[j] > t and d2[j] < best:
                best = d2[j]
        if best == np.int64(1) << 62:
            break
        t = best
    return t


@njit(cache=True, parallel=True)
def _count(points, kmap, bits, nwant, counts):
    """counts[u] = number of neighbours of each lattice point u that is not on the grid."""
    for u in prange(kmap.shape[0]):
        if kmap[u] >= 0:
            counts[u] = 0
            continue
        d2 = np.empty(points.shape[0], np.int32)
        _distances(u, points, bits, d2)
        t = _threshold(d2, nwant)
        n = 0
        for j in range(d2.shape[0]):
            if d2[j] <= t:
                n += 1
        counts[u] = n


@njit(cache=True, parallel=True)
def _fill(points, kmap, bits, nwant, offsets, neighbours):
    """Writes each off-grid point's list at its offset: count, then indices by (distance, index)."""
    for u in prange(kmap.shape[0]):
        if kmap[u] >= 0:
            continue
        d2 = np.empty(points.shape[0], np.int32)
        _distances(u, points, bits, d2)
        at = offsets[u]
        start = at
        at += 1
        t = -1
        for _ in range(nwant):
            best = np.int64(1) << 62
            for j in range(d2.shape[0]):
                if d2[j] > t and d2[j] < best:
                    best = d2[j]
            if best == np.int64(1) << 62:
                break
            t = best
            for j in range(d2.shape[0]):
                if d2[j] == t:
                    neighbours[at] = j
                    at += 1
        neighbours[start] = at - start - 1


def build_search_tables(codes: np.ndarray, bits: int, dims: int, kmap_size: int, nwant: int) -> SearchTables:
    """ggml's init for a grid given as packed levels codes: u16 [n] (`bits` per element, `dims` elements)."""
    codes = np.asarray(codes, np.int64)
    levels = (codes[:, None] >> (bits * np.arange(dims))) & ((1 << bits) - 1)
    points = np.ascontiguousarray(2 * levels + 1, np.int8)  # [n, dims]
    kmap = np.full(kmap_size, -1, np.int32)
    kmap[codes] = np.arange(codes.shape[0], dtype=np.int32)
    counts = np.empty(kmap_size, np.int64)
    _count(points, kmap, bits, nwant, counts)
    off_grid = kmap < 0
    sizes = np.where(off_grid, counts + 1, 0)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    neighbours = np.empty(int(sizes.sum()), np.uint16)
    _fill(points, kmap, bits, nwant, offsets, neighbours)
    kmap[off_grid] = -(offsets[off_grid] + 1).astype(np.int32)
    for a in (points, kmap, neighbours):
        a.setflags(write=False)
    return SearchTables(points, kmap, neighbours)


@cache
def search_tables(name: str) -> SearchTables:
    """The search tables of grid `name` (iq2xxs, iq2xs, iq2s, iq3xxs, iq3s), built once per process."""
    t = build_search_tables(kgrid(name), BITS[name], quant_points(name).shape[1], KMAP_SIZE[name], NWANT[name])
    assert np.array_equal(t.points, quant_points(name))
    return t


__all__ = ["IQ2_KMAP_SIZE", "IQ3_KMAP_SIZE", "KMAP_SIZE", "NWANT", "SearchTables", "build_search_tables",
           "search_tables"]
