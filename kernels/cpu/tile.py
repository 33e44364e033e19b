"""A register-blocked matrix-product tile for the CPU kernels, written as LLVM vector IR.

`C[m, :] = A[m, :depth] @ B[:depth, :]` for `rows` rows of A and one packed
panel of B, `vectors * 16` columns wide. The accumulators are `rows * vectors
* unroll` vectors of 16 float32 that LLVM keeps in registers (zmm on AVX-512,
pairs of ymm on AVX2); each step of the depth loop loads `vectors` vectors of
B and broadcasts `rows` scalars of A into fused multiply-adds.

Why IR and not a loop in Numba or a BLAS call: Numba's auto-vectorizer does
not keep a tile of accumulators in registers (it spills and stays scalar
unless global compiler flags are changed), and a BLAS call per step is slow
for these small products: SciPy's OpenBLAS is pinned to its AVX2 kernels on
some machines (OPENBLAS_CORETYPE) and MKL takes slow paths on AMD CPUs.
Written here, the tile is the same code on every x86 CPU, and its vector
width is explicit, so it does not depend on how LLVM tunes its vectorizer for
the host.

The caller guarantees the bounds: A has `rows` rows of `depth` floats at
stride `lda` from `a_off`, B has `depth` rows of `vectors * 16` floats from
`b_off`, and C has `rows` rows of `vectors * 16` floats at stride `ldc` from
`c_off`. Offsets and strides count float32 elements.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16

_F32 = ir.FloatType()
_VECTOR = ir.VectorType(_F32, LANES)
_INDEX = ir.IntType(64)


def make_tile(rows, vectors, unroll):
    """A Numba intrinsic `tile(a, a_off, lda, b, b_off, c, c_off, ldc, depth)`.

    Args:
        rows: rows of A and C the tile computes.
        vectors: 16-float vectors per row of the B panel and of C.
        unroll: independent accumulators per output vector, summed at the end;
            enough in all (`rows * vectors * unroll` >= 8) hides the latency of
            the multiply-adds.
    """

    @intrinsic
    def tile(typingctx, a, a_off, lda, b, b_off, c, c_off, ldc, depth):
        arrays = (a, b, c)
        if not all(isinstance(t, types.Array) and t.dtype == types.float32 for t in arrays):
            return None
        index = types.intp
        signature = types.void(a, index, index, b, index, c, index, index, index)

        def codegen(context, builder, sig, args):
            a_arr, a_off, lda, b_arr, b_off, c_arr, c_off, ldc, depth = args
            a_ptr = builder.gep(_data(context, builder, a, a_arr), [a_off])
            b_ptr = builder.gep(_data(context, builder, b, b_arr), [b_off])
            c_ptr = builder.gep(_data(context, builder, c, c_arr), [c_off])
            emit = _TileEmitter(builder, rows, vectors, unroll, a_ptr, lda, b_ptr)
            steps = builder.sdiv(depth, ir.Constant(_INDEX, unroll))
            with cgutils.for_range(builder, steps) as loop:
                base = builder.mul(loop.index, ir.Constant(_INDEX, unroll))
                for u in range(unroll):
                    emit.multiply_add(builder.add(base, ir.Constant(_INDEX, u)), u)
            start = builder.mul(steps, ir.Constant(_INDEX, unroll))
            with cgutils.for_range_slice(builder, start, depth, ir.Constant(_INDEX, 1)) as (k, _):
                emit.multiply_add(k, 0)
            emit.store(c_ptr, ldc)
            return context.get_dummy_value()

        return signature, codegen

    return tile


def _data(context, builder, array_type, value):
    return context.make_array(array_type)(context, builder, value).data


class _TileEmitter:
    """Emits the accumulators, one depth step of multiply-adds, and the final store."""

    def __init__(self, builder, rows, vectors, unroll, a_ptr, lda, b_ptr):
        self.builder = builder
        self.rows, self.vectors, self.unroll = rows, vectors, unroll
        self.a_ptr, self.lda, self.b_ptr = a_ptr, lda, b_ptr
        self.fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VECTOR, [_VECTOR] * 3), "llvm.fma.v16f32")
        zero = ir.Constant(_VECTOR, None)
        self.acc = [[[cgutils.alloca_once_value(builder, zero) for _ in range(vectors)]
                     for _ in range(rows)] for _ in range(unroll)]

    def multiply_add(self, k, u):
        builder = self.builder
        width = ir.Constant(_INDEX, self.vectors * LANES)
        b_row = builder.gep(self.b_ptr, [builder.mul(k, width)])
        b = [self._load_vector(builder.gep(b_row, [ir.Constant(_INDEX, v * LANES)]))
             for v in range(self.vectors)]
        for m in range(self.rows):
            a_index = builder.add(builder.mul(ir.Constant(_INDEX, m), self.lda), k)
            a = self._splat(builder.load(builder.gep(self.a_ptr, [a_index])))
            for v in range(self.vectors):
                slot = self.acc[u][m][v]
                builder.store(builder.call(self.fma, [a, b[v], builder.load(slot)]), slot)

    def store(self, c_ptr, ldc):
        builder = self.builder
        for m in range(self.rows):
            c_row = builder.gep(c_ptr, [builder.mul(ir.Constant(_INDEX, m), ldc)])
            for v in range(self.vectors):
                total = builder.load(self.acc[0][m][v])
                for u in range(1, self.unroll):
                    total = builder.fadd(total, builder.load(self.acc[u][m][v]))
                target = builder.gep(c_row, [ir.Constant(_INDEX, v * LANES)])
                builder.store(total, builder.bitcast(target, _VECTOR.as_pointer()), align=4)

    def _load_vector(self, pointer):
        return self.builder.load(self.builder.bitcast(pointer, _VECTOR.as_pointer()), align=4)

    def _splat(self, scalar):
        builder = self.builder
        one = builder.insert_element(ir.Constant(_VECTOR, ir.Undefined), scalar,
                                     ir.Constant(ir.IntType(32), 0))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), LANES), None)
        return builder.shuffle_vector(one, ir.Constant(_VECTOR, ir.Undefined), mask)
