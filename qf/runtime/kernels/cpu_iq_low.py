"""Decoders for ggml's grid IQ types: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S (signed grid points times a scale)
and IQ1_S, IQ1_M (ternary grid points plus a shift), in f32 and integer (cpu_idecode.py) forms.

Every 32-element unit is built as 32 signed bytes in one vector (`q8x32`): its grid indices are computed
lanewise (low bits | high bits from qh, each masked to its table's size, so arbitrary bytes never index
outside the tables), then the entries are fetched from a flat table (cpu_iq_grids.py) by one vector gather: 8
entries of 4 bytes (IQ3) or 4 entries of 8 bytes (IQ2, IQ1); measured faster than scalar loads for both on
AVX-512 (non-x86 targets get the gather scalarized by LLVM). Signs come from a 32-bit lane mask: stored bits
(IQ2_S, IQ3_S), or ggml's ksigns of 7-bit indices, computed (the 7 bits plus their parity) instead of looked
up. IQ1's value g + delta (delta = +-1/8) is kept as the integer 8 g +- 1 with the scale divided by 8 (exact:
a power of two). Scales shared by a block (IQ2_XS, IQ2_S, IQ3_S) are decoded once per block as a vector.

The f32 form widens the bytes and multiplies each 16 lanes by their scale; the integer form is q = v + 128
with s = scale and m = -128 s. Formulas follow ggml-quants.c (dequantize_row_iq*). All values are exact in f32
(a half times small integers), so rows equal gguf.quants bit for bit.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from qf.format.ggml_types import GGMLType, type_size
from qf.runtime.kernels.cpu_decoder import FASTMATH, Decoder
from qf.runtime.kernels.cpu_idecode import IntDecoder
from qf.runtime.kernels.cpu_iq_grids import tables
from qf.runtime.kernels.cpu_isimd import _target_features, q8x32, q8x64, q_xor, vget
from qf.runtime.kernels.cpu_registry import register, register_int
from qf.runtime.kernels.cpu_simd import byte_fields, f16_at, f32x16, vadd, vmul, vsplat

_JIT = dict(inline="always", fastmath=FASTMATH, cache=True)

_T = tables()
G2XXS, G2XS, G2S = _T["iq2xxs"], _T["iq2xs"], _T["iq2s"]  # u8 [n * 8]
G3XXS, G3S = _T["iq3xxs"], _T["iq3s"]  # u8 [n * 4]
G1S = _T["iq1s"]  # i8 values as u8 [2048 * 8]

_B2XXS = type_size(GGMLType.IQ2_XXS)  # d, qs[64]
_B2XS = type_size(GGMLType.IQ2_XS)  # d, qs[64] (u16), scales[8]
_B2S = type_size(GGMLType.IQ2_S)  # d, qs[32], signs[32], qh[8], scales[8]
_B3XXS = type_size(GGMLType.IQ3_XXS)  # d, qs[64], scales_and_signs[32]
_B3S = type_size(GGMLType.IQ3_S)  # d, qs[64], qh[8], signs[32], scales[4]
_B1S = type_size(GGMLType.IQ1_S)  # d, qs[32], qh[8] (u16)
_B1M = type_size(GGMLType.IQ1_M)  # qs[32], qh[16], scales[8] (4 u16 holding d in their top nibbles)

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_V32I8 = ir.VectorType(_I8, 32)
_V16I32 = ir.VectorType(_I32, 16)
_V16F = ir.VectorType(ir.FloatType(), 16)
_MASK32 = ir.VectorType(ir.IntType(1), 32)
_AVX2 = "avx2" in _target_features()  # x86 gathers with the entry width as the address scale


# ------------------------------------------------------------------ intrinsics

def _ptr(context, builder, aryty, ary, off, llty):
    """Pointer to byte offset off of a u8 array, cast to llty*."""
    a = context.make_array(aryty)(context, builder, ary)
    o = context.cast(builder, off, types.int64, types.intp)
    return builder.bitcast(builder.gep(a.data, [o]), llty.as_pointer())


def _scalar_load(width: int):
    """An intrinsic (row, off) -> int64: the little-endian unsigned `width`-byte integer at byte off."""
    lt = ir.IntType(8 * width)

    @intrinsic
    def load(typingctx, row, off):
        def codegen(context, builder, sig, args):
            o = context.cast(builder, args[1], sig.args[1], types.int64)
            v = builder.load(_ptr(context, builder, sig.args[0], args[0], o, lt), align=1)
            return builder.zext(v, _I64)
        return types.int64(row, off), codegen
    return load


u16_at = _scalar_load(2)
u32_at = _scalar_load(4)


def _vgather(builder, tab_ptr, idx, width: int):
    """Entries idx (<n x i32>, in range) of a flat table of `width`-byte entries at tab_ptr: <n x i(8 width)>.

    On x86 with AVX2, ggml's gather instruction with the entry width as its address scale (vpgatherdd /
    vpgatherdq); elsewhere LLVM's generic masked gather (scalarized where there is no gather)."""
    n = idx.type.count
    et = ir.IntType(8 * width)
    vt = ir.VectorType(et, n)
    if _AVX2:
        name = f"llvm.x86.avx2.gather.d.{'d' if width == 4 else 'q'}.{'256' if n * width == 32 else '128'}"
        fnty = ir.FunctionType(vt, [vt, ir.PointerType(), idx.type, vt, _I8])
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        return builder.call(fn, [ir.Constant(vt, None), builder.bitcast(tab_ptr, ir.PointerType()), idx,
                                 ir.Constant(vt, [-1] * n), ir.Constant(_I8, width)])
    v64 = ir.VectorType(_I64, n)
    base = builder.insert_element(ir.Constant(v64, ir.Undefined), builder.ptrtoint(tab_ptr, _I64), ir.Constant(_I32, 0))
    base = builder.shuffle_vector(base, ir.Constant(v64, ir.Undefined), ir.Constant(ir.VectorType(_I32, n), [0] * n))
    addr = builder.add(base, builder.mul(builder.zext(idx, v64), ir.Constant(v64, [width] * n)))
    pty = ir.VectorType(ir.PointerType(), n)
    mty = ir.VectorType(ir.IntType(1), n)
    fnty = ir.FunctionType(vt, [pty, _I32, mty, vt])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.gather.v{n}i{8 * width}.v{n}p0")
    return builder.call(fn, [builder.inttoptr(addr, pty), ir.Constant(_I32, width), ir.Constant(mty, [1] * n),
                             ir.Constant(vt, None)])


def _splat_n(builder, scalar, n: int):
    """A scalar i32 in all n lanes."""
    vt = ir.VectorType(scalar.type, n)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(_I32, n), [0] * n))


def grid_loader(width: int, src: int, lo_mask: int, up: int = 0, shifts: tuple[int, ...] = (), hi_mask: int = 0):
    """An intrinsic (table, row, off, hi) -> q8x32 loading the unit's 32 // width grid entries by vector gather.

    Index k = (src-byte little-endian word k at row[off:] & lo_mask) | (((hi << up) >> shifts[k]) & hi_mask);
    the masks keep every index inside the table (the caller's table has at least lo_mask | hi_mask + 1 entries).
    """
    n = 32 // width
    st = ir.IntType(8 * src)
    vi = ir.VectorType(_I32, n)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[1])(context, builder, args[1])
        o = context.cast(builder, args[2], sig.args[2], types.intp)
        ptr = builder.bitcast(builder.gep(a.data, [o]), ir.VectorType(st, n).as_pointer())
        idx = builder.and_(builder.zext(builder.load(ptr, align=1), vi), ir.Constant(vi, [lo_mask] * n))
        if hi_mask and shifts == tuple(range(n)) and hi_mask == 1 << up:  # one bit per entry: a lane mask
            bits = builder.trunc(context.cast(builder, args[3], sig.args[3], types.int64), ir.IntType(n))
            idx = builder.or_(idx, builder.select(builder.bitcast(bits, ir.VectorType(ir.IntType(1), n)),
                                                  ir.Constant(vi, [hi_mask] * n), ir.Constant(vi, None)))
        elif hi_mask:
            hi = builder.trunc(context.cast(builder, args[3], sig.args[3], types.int64), _I32)
            h = builder.shl(_splat_n(builder, hi, n), ir.Constant(vi, [up] * n))
            h = builder.and_(builder.lshr(h, ir.Constant(vi, list(shifts))), ir.Constant(vi, [hi_mask] * n))
            idx = builder.or_(idx, h)
        tab = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.bitcast(_vgather(builder, tab.data, idx, width), _V32I8)

    @intrinsic
    def load(typingctx, tab, row, off, hi):
        return q8x32(tab, row, off, hi), codegen
    return load


def _sign_bytes(builder, sidx):
    """The 32-bit lane mask of four 7-bit sign indices <4 x i32>: byte k = ksigns[sidx[k]], computed as ggml's
    table is built: the 7 bits, plus their parity as bit 7."""
    v4 = ir.VectorType(_I32, 4)
    pop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v4, [v4]), "llvm.ctpop.v4i32")
    par = builder.and_(builder.call(pop, [sidx]), ir.Constant(v4, [1] * 4))
    s = builder.trunc(builder.or_(sidx, builder.shl(par, ir.Constant(v4, [7] * 4))), ir.VectorType(_I8, 4))
    return builder.zext(builder.bitcast(s, _I32), _I64)


@intrinsic
def ksigns_packed(typingctx, aux):
    """Lane mask of the four 7-bit sign indices at bits 0, 7, 14, 21 of aux (IQ2_XXS, IQ3_XXS)."""
    def codegen(context, builder, sig, args):
        a = builder.trunc(context.cast(builder, args[0], sig.args[0], types.int64), _I32)
        v4 = ir.VectorType(_I32, 4)
        sidx = builder.and_(builder.lshr(_splat_n(builder, a, 4), ir.Constant(v4, [0, 7, 14, 21])),
                            ir.Constant(v4, [127] * 4))
        return _sign_bytes(builder, sidx)
    return types.int64(aux), codegen


@intrinsic
def ksigns_u16(typingctx, row, off):
    """Lane mask of the sign indices in the top 7 bits of the four u16 at row[off:] (IQ2_XS)."""
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        o = context.cast(builder, args[1], sig.args[1], types.intp)
        v4 = ir.VectorType(_I32, 4)
        w = builder.load(builder.bitcast(builder.gep(a.data, [o]), ir.VectorType(ir.IntType(16), 4).as_pointer()),
                         align=1)
        sidx = builder.lshr(builder.zext(w, v4), ir.Constant(v4, [9] * 4))
        return _sign_bytes(builder, sidx)
    return types.int64(row, off), codegen


# the unit loaders of each type (see ggml-quants.c's dequantize_row_iq*)
ld_iq2_xxs = grid_loader(8, 1, 255)
ld_iq2_xs = grid_loader(8, 2, 511)
ld_iq2_s = grid_loader(8, 1, 255, 8, (0, 2, 4, 6), 0x300)
ld_iq3_xxs = grid_loader(4, 1, 255)
ld_iq3_s = grid_loader(4, 1, 255, 8, (0, 1, 2, 3, 4, 5, 6, 7), 0x100)
ld_iq1_s = grid_loader(8, 1, 255, 8, (0, 3, 6, 9), 0x700)
ld_iq1_m = grid_loader(8, 1, 255, 8, (0, 4, 8, 12), 0x700)


def _lane_mask(context, builder, sig, args, i):
    """The low 32 bits of integer args[i] as a <32 x i1> lane mask (bit k -> lane k)."""
    bits = context.cast(builder, args[i], sig.args[i], types.int64)
    return builder.bitcast(builder.trunc(bits, _I32), _MASK32)


@intrinsic
def q_signs(typingctx, q, bits):
    """Lane k negated where bit k of bits is set."""
    def codegen(context, builder, sig, args):
        neg = builder.sub(ir.Constant(_V32I8, None), args[0])
        return builder.select(_lane_mask(context, builder, sig, args, 1), neg, args[0])
    return q8x32(q, bits), codegen


@intrinsic
def q_shift8(typingctx, q, bits):
    """8 q - 1 where bit k of bits is set, else 8 q + 1 (IQ1's 8 (g + delta), delta = -+1/8)."""
    def codegen(context, builder, sig, args):
        q8 = builder.shl(args[0], ir.Constant(_V32I8, [3] * 32))
        d = builder.select(_lane_mask(context, builder, sig, args, 1), ir.Constant(_V32I8, [255] * 32),
                           ir.Constant(_V32I8, [1] * 32))
        return builder.add(q8, d)
    return q8x32(q, bits), codegen


@intrinsic
def q_f32(typingctx, q, s0, s1):
    """(lanes 0-15 * s0, lanes 16-31 * s1) of a signed q8x32, as two f32x16."""
    def codegen(context, builder, sig, args):
        out = []
        for k in range(2):
            part = builder.shuffle_vector(args[0], ir.Constant(_V32I8, ir.Undefined),
                                          ir.Constant(_V16I32, list(range(16 * k, 16 * k + 16))))
            f = builder.sitofp(part, _V16F)
            s = context.cast(builder, args[1 + k], sig.args[1 + k], types.float32)
            vs = builder.insert_element(ir.Constant(_V16F, ir.Undefined), s, ir.Constant(_I32, 0))
            vs = builder.shuffle_vector(vs, ir.Constant(_V16F, ir.Undefined), ir.Constant(_V16I32, [0] * 16))
            out.append(builder.fmul(f, vs, flags=("contract",)))
        return context.make_tuple(builder, sig.return_type, out)
    return types.UniTuple(f32x16, 2)(q, s0, s1), codegen


@njit(**_JIT)
def _fl(v):
    """An integer as f32."""
    return types.float32(v)


# ------------------------------------------------------------------ per-type units: (signed q8x32, s0, s1)

@njit(**_JIT)
def head_d(row, b, size):
    """(d,) of a block whose f16 scale leads it."""
    return (f16_at(row, b * size),)


@njit(**_JIT)
def head_iq2_xxs(row, b):
    """(d,)."""
    return head_d(row, b, _B2XXS)


@njit(**_JIT)
def q_iq2_xxs(row, b, j, h):
    """4 grid bytes, then 4 sign indices and the scale in one u32: db = d (0.5 + s) / 4."""
    o = b * _B2XXS + 2 + 8 * j
    aux = u32_at(row, o + 4)
    db = h[0] * (_fl(aux >> 28) + types.float32(0.5)) * types.float32(0.25)
    return q_signs(ld_iq2_xxs(G2XXS, row, o, 0), ksigns_packed(aux)), db, db


_nib16 = byte_fields(a=tuple(i // 2 for i in range(16)), shift_a=tuple(4 * (i % 2) for i in range(16)),
                     mask_a=(15,) * 16, b=(0,) * 16, shift_b=(0,) * 16, mask_b=(0,) * 16, up=0)  # 16 nibbles
_nib8 = byte_fields(a=tuple(i % 8 // 2 for i in range(16)), shift_a=tuple(4 * (i % 2) for i in range(16)),
                    mask_a=(15,) * 16, b=(0,) * 16, shift_b=(0,) * 16, mask_b=(0,) * 16, up=0)  # 8 nibbles, twice


@njit(**_JIT)
def _iq2_scales(row, o, d):
    """Lanes i = d (0.5 + nibble i of the 8 scale bytes at o) / 4 (ggml's order of operations, in f32)."""
    return vmul(vmul(vsplat(d), vadd(_nib16(row, o), vsplat(0.5))), vsplat(0.25))


@njit(**_JIT)
def head_iq2_xs(row, b):
    """(d, the 16 sub-block scales)."""
    d = f16_at(row, b * _B2XS)
    return d, _iq2_scales(row, b * _B2XS + 66, d)


@njit(**_JIT)
def q_iq2_xs(row, b, j, h):
    """4 u16: 9-bit grid index, 7-bit sign index; a 4-bit scale per 16 weights."""
    o = b * _B2XS
    q = q_signs(ld_iq2_xs(G2XS, row, o + 2 + 8 * j, 0), ksigns_u16(row, o + 2 + 8 * j))
    return q, vget(h[1], 2 * j), vget(h[1], 2 * j + 1)


@njit(**_JIT)
def head_iq2_s(row, b):
    """(d, the 16 sub-block scales)."""
    d = f16_at(row, b * _B2S)
    return d, _iq2_scales(row, b * _B2S + 74, d)


@njit(**_JIT)
def q_iq2_s(row, b, j, h):
    """10-bit grid indices (8 low bits in qs, 2 in qh), 32 stored sign bits, a 4-bit scale per 16."""
    o = b * _B2S
    qs = o + 2 + 4 * j
    qh = int(row[o + 66 + j])
    q = ld_iq2_s(G2S, row, qs, qh)
    return q_signs(q, u32_at(row, o + 34 + 4 * j)), vget(h[1], 2 * j), vget(h[1], 2 * j + 1)


@njit(**_JIT)
def head_iq3_xxs(row, b):
    """(d,)."""
    return head_d(row, b, _B3XXS)


@njit(**_JIT)
def q_iq3_xxs(row, b, j, h):
    """8 grid bytes (4 values each), then a u32 of 4 sign indices and the scale: db = d (0.5 + s) / 2."""
    o = b * _B3XXS
    g = o + 2 + 8 * j
    aux = u32_at(row, o + 66 + 4 * j)
    db = h[0] * (_fl(aux >> 28) + types.float32(0.5)) * types.float32(0.5)
    return q_signs(ld_iq3_xxs(G3XXS, row, g, 0), ksigns_packed(aux)), db, db


@njit(**_JIT)
def head_iq3_s(row, b):
    """(d, lanes j = d (1 + 2 s_j))."""
    o = b * _B3S
    d = f16_at(row, o)
    return d, vmul(vsplat(d), vadd(vadd(_nib8(row, o + 106), _nib8(row, o + 106)), vsplat(1.0)))


@njit(**_JIT)
def q_iq3_s(row, b, j, h):
    """9-bit grid indices (bit k of qh is entry k's ninth), 32 stored sign bits, db = d (1 + 2 s)."""
    o = b * _B3S
    g = o + 2 + 8 * j
    qh = int(row[o + 66 + j])
    q = ld_iq3_s(G3S, row, g, qh)
    db = vget(h[1], j)
    return q_signs(q, u32_at(row, o + 74 + 4 * j)), db, db


@njit(**_JIT)
def head_iq1_s(row, b):
    """(d,)."""
    return head_d(row, b, _B1S)


@njit(**_JIT)
def q_iq1_s(row, b, j, h):
    """11-bit grid indices (3 high bits in qh), dl = d (2 s + 1) and the delta's sign in qh's top bits."""
    o = b * _B1S
    qs = o + 2 + 4 * j
    qh = u16_at(row, o + 34 + 2 * j)
    q = ld_iq1_s(G1S, row, qs, qh)
    dl = h[0] * _fl(2 * ((qh >> 12) & 7) + 1) * types.float32(0.125)
    return q_shift8(q, -(qh >> 15)), dl, dl


@njit(**_JIT)
def head_iq1_m(row, b):
    """(d,): the f16 whose four nibbles top the four u16 scales."""
    o = b * _B1M + 48
    bits = ((u16_at(row, o) >> 12) | ((u16_at(row, o + 2) >> 8) & 0xF0) | ((u16_at(row, o + 4) >> 4) & 0xF00)
            | (u16_at(row, o + 6) & 0xF000))
    return (_f16_bits(bits),)


@intrinsic
def _f16_bits(typingctx, bits):
    """The IEEE half with these 16 bits, as f32."""
    def codegen(context, builder, sig, args):
        h = builder.trunc(context.cast(builder, args[0], sig.args[0], types.int64), ir.IntType(16))
        return builder.fpext(builder.bitcast(h, ir.HalfType()), ir.FloatType())
    return types.float32(bits), codegen


@njit(**_JIT)
def q_iq1_m(row, b, j, h):
    """11-bit indices (3 high bits per nibble of qh), a delta sign per 8 (qh bits 3, 7), dl per 16."""
    o = b * _B1M
    qs = o + 4 * j
    qa = int(row[o + 32 + 2 * j])
    qb = int(row[o + 33 + 2 * j])
    sc = u16_at(row, o + 48 + 2 * (j // 2)) >> (6 * (j % 2))
    q = ld_iq1_m(G1S, row, qs, qa | (qb << 8))
    neg = (-((qa >> 3) & 1) & 0xFF) | (-((qa >> 7) & 1) & 0xFF00) | (-((qb >> 3) & 1) & 0xFF0000) \
        | (-((qb >> 7) & 1) & 0xFF000000)
    d0 = h[0] * _fl(2 * (sc & 7) + 1) * types.float32(0.125)
    d1 = h[0] * _fl(2 * ((sc >> 3) & 7) + 1) * types.float32(0.125)
    return q_shift8(q, neg), d0, d1


# ------------------------------------------------------------------ the two forms of each type

def _forms(qfn, head):
    """(f32 unit, integer head, integer quants, integer scales) of a (signed q8x32, s0, s1) unit function.

    The integer head is the f32 head followed by (row, b), one flat tuple (numba's parfor analysis rejects
    nested ones): the scales of unit j are read with its quants' bytes (the grid loads they do not use are
    dead code there)."""
    @njit(**_JIT)
    def unit(row, b, j, h):
        q, s0, s1 = qfn(row, b, j, h)
        return q_f32(q, s0, s1)

    @njit(**_JIT)
    def ihead(row, b):
        return head(row, b) + (row, b)

    @njit(**_JIT)
    def quants(row, b, j, h):
        q, s0, s1 = qfn(row, b, j, h)
        return q_xor(q, 128)

    @njit(**_JIT)
    def scales(h, j):
        q, s0, s1 = qfn(h[-2], h[-1], j, h)
        return s0, types.float32(-128.0) * s0, s1, types.float32(-128.0) * s1

    return unit, ihead, quants, scales


_TYPES = {  # type -> (head, signed unit, sub-blocks per unit in the integer form)
    GGMLType.IQ2_XXS: (head_iq2_xxs, q_iq2_xxs, 1),
    GGMLType.IQ2_XS: (head_iq2_xs, q_iq2_xs, 2),
    GGMLType.IQ2_S: (head_iq2_s, q_iq2_s, 2),
    GGMLType.IQ3_XXS: (head_iq3_xxs, q_iq3_xxs, 1),
    GGMLType.IQ3_S: (head_iq3_s, q_iq3_s, 1),
    GGMLType.IQ1_S: (head_iq1_s, q_iq1_s, 1),
    GGMLType.IQ1_M: (head_iq1_m, q_iq1_m, 2),
}
_FORMS = {t: _forms(q, hd) for t, (hd, q, _) in _TYPES.items()}

DECODERS: dict[GGMLType, Decoder] = register({t: Decoder(_TYPES[t][0], f[0], 8) for t, f in _FORMS.items()})
IDECODERS: dict[GGMLType, IntDecoder] = register_int(
    {t: IntDecoder(f[1], f[2], f[3], 8, _TYPES[t][2]) for t, f in _FORMS.items()})
