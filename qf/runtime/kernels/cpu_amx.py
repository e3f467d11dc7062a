"""Intel AMX tiles for numba kernels: tile configuration, loads, stores and the s8 x u8 tile dot product.

AMX (Sapphire Rapids and later) holds 8 tile registers of up to 16 rows x 64 bytes; `tdpbsud` adds to an
i32 tile C [16 x 16] the products of a signed byte tile A [16 x K] with an unsigned byte tile B [K/4 x 64]
whose row k holds 4 consecutive bytes (K index 4k .. 4k + 3) of each of the 16 columns: exactly the slice
layout of the integer kernels' panels (cpu_int8.py), so a panel unit is a B tile as it lies in memory.

The intrinsics are LLVM's immediate-operand ones (`llvm.x86.tileloadd64` and friends: tile numbers are
compile-time constants), so no asm parser is needed. Linux hands AMX state to a process only on request
(`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`): `supported()` asks once and says whether the CPU,
the kernel and numba's LLVM target all have it; `enabled()` adds the opt-in (QF_AMX=1). The tile
configuration is per thread: each worker configures before its first tile instruction and releases after
its last.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache

from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic

_I8 = ir.IntType(8)
_I64 = ir.IntType(64)
_P8 = _I8.as_pointer()

_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def enabled() -> bool:
    """Whether the kernels use AMX: opt-in (QF_AMX=1) where `supported()`. Not a default: on a shared
    2-core host the tile kernels measured +15-20% per matmul (1 thread) but no steady whole-model gain, and
    they add compile time (see cpu_repack.py)."""
    return os.environ.get("QF_AMX", "0") == "1" and supported()


def supported() -> bool:
    """Whether AMX-INT8 tiles can be used here: CPU flags, numba's LLVM target and the kernel's permission
    (asked for once)."""
    return _usable("int8")


def supported_bf16() -> bool:
    """Whether AMX-BF16 tiles (tdpbf16ps) can be used here, as `supported()` asks for AMX-INT8."""
    return _usable("bf16")


@lru_cache(maxsize=None)
def _usable(unit: str) -> bool:
    """Whether the tile unit `unit` ("int8" or "bf16") can be used: CPU flags, numba's LLVM target and the
    kernel's permission (asked for once per process)."""
    from qf.runtime.kernels.cpu_isimd import _target_features

    if not {f"amx-{unit}", "amx-tile"} <= _target_features():
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    if f" amx_{unit}" not in flags or " amx_tile" not in flags:
        return False
    return _permission()


@lru_cache(maxsize=None)
def _permission() -> bool:
    """Ask Linux once for the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM); whether it was granted."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def _call(builder, name: str, args, argtys) -> None:
    """Call the void LLVM intrinsic `name`."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), argtys), name)
    builder.call(fn, args)


def _tile(k) -> int:
    """A tile number given as a compile-time literal (0..7)."""
    if not isinstance(k, types.IntegerLiteral) or not 0 <= k.literal_value < 8:
        raise errors.TypingError("AMX tile numbers must be integer literals 0..7")
    return k.literal_value


def _byte_ptr(context, builder, aryty, ary, off, offty):
    """i8* to element off of a contiguous 1-byte array, or to byte off of any other array."""
    a = context.make_array(aryty)(context, builder, ary)
    o = context.cast(builder, off, offty, types.intp)
    return builder.gep(builder.bitcast(a.data, _P8), [o])


@intrinsic
def tile_config(typingctx, cfg):
    """ldtilecfg from cfg (u8 [64]: palette 1, then 16 u16 bytes-per-row and 16 u8 row counts)."""
    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.ldtilecfg", [_byte_ptr(context, builder, sig.args[0], args[0],
                                                           context.get_constant(types.intp, 0), types.intp)], [_P8])
        return context.get_dummy_value()
    return types.none(cfg), codegen


@intrinsic
def tile_release(typingctx):
    """tilerelease: the thread's tiles back to the init state."""
    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tilerelease", [], [])
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic
def tile_zero(typingctx, k):
    """Tile k = 0."""
    n = _tile(k)

    def codegen(context, builder, sig, args):
        _call(builder, "llvm.x86.tilezero", [ir.Constant(_I8, n)], [_I8])
        return context.get_dummy_value()
    return types.none(k), codegen


def _tile_memory(llvm_name: str, doc: str):
    """An intrinsic (k, arr, off, stride) moving tile k's rows to or from byte off of arr, stride bytes apart."""
    def tile_op(typingctx, k, arr, off, stride):
        n = _tile(k)

        def codegen(context, builder, sig, args):
            p = _byte_ptr(context, builder, sig.args[1], args[1], args[2], sig.args[2])
            s = context.cast(builder, args[3], sig.args[3], types.int64)
            _call(builder, llvm_name, [ir.Constant(_I8, n), p, s], [_I8, _P8, _I64])
            return context.get_dummy_value()
        return types.none(k, arr, off, stride), codegen
    tile_op.__doc__ = doc
    return intrinsic(tile_op)


tile_load = _tile_memory("llvm.x86.tileloadd64", "Tile k = its rows from byte off of arr (element off for byte "
                         "arrays), rows stride bytes apart.")
tile_store = _tile_memory("llvm.x86.tilestored64", "Tile k's rows to byte off of arr, stride bytes apart.")


def _tile_product(llvm_name: str, doc: str):
    """An intrinsic (c, a, b): the tile product `llvm_name` adding a . b to tile c (all tile literals)."""
    def tile_op(typingctx, c, a, b):
        nc, na, nb = _tile(c), _tile(a), _tile(b)

        def codegen(context, builder, sig, args):
            _call(builder, llvm_name, [ir.Constant(_I8, v) for v in (nc, na, nb)], [_I8, _I8, _I8])
            return context.get_dummy_value()
        return types.none(c, a, b), codegen
    tile_op.__doc__ = doc
    return intrinsic(tile_op)


tile_dot = _tile_product("llvm.x86.tdpbsud", "Tile c += a (s8 [16 x K]) . b (u8 [K/4 x 64], 4 bytes per column "
                         "per row): tdpbsud.")
tile_dot_bf16 = _tile_product("llvm.x86.tdpbf16ps", "Tile c (f32 [16 x 16]) += a (bf16 [16 x K]) . b (bf16 "
                              "[K/2 x 64 bytes], a pair of consecutive K per column per row): tdpbf16ps.")


__all__ = ["enabled", "supported", "supported_bf16", "tile_config", "tile_dot", "tile_dot_bf16", "tile_load",
           "tile_release", "tile_store", "tile_zero"]
