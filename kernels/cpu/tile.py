"""A register-blocked matrix-product tile for the CPU kernels, written as LLVM vector IR.

`C[m, :] = A[m, :depth] @ B[:depth, :]` for `rows` rows of A and one packed
panel of B, `vectors * lanes` columns wide. The accumulators are `rows *
vectors * unroll` vectors of `lanes` float32 that LLVM keeps in registers;
each step of the depth loop loads `vectors` vectors of B and broadcasts `rows`
scalars of A into multiply-adds.

Why IR and not a loop in Numba or a BLAS call: Numba's auto-vectorizer does
not keep a tile of accumulators in registers (it spills and stays scalar
unless global compiler flags are changed), and a BLAS call per step is slow
for these small products: SciPy's OpenBLAS is pinned to its AVX2 kernels on
some machines (OPENBLAS_CORETYPE) and MKL takes slow paths on AMD CPUs.
Written here, the vector width is explicit, so it does not depend on how LLVM
tunes its vectorizer for the host.

The width is the target's: `vector_target()` asks LLVM, for the CPU name and
features Numba compiles for (`NUMBA_CPU_NAME`, `NUMBA_CPU_FEATURES`, else the
host), how it lowers a 16-float add and multiply-add: zmm registers (AVX-512,
32 of them), ymm (AVX2 or AVX, 16), xmm or NEON (4 floats; AArch64 has 32
registers), and whether it has a fused multiply-add at all (without one, `llvm.fma` becomes a
call to libm's `fmaf` per lane, so the tile multiplies and adds instead).
`panels` picks the tile shapes that fit that many registers.

The caller guarantees the bounds: A has `rows` rows of `depth` floats at
stride `lda` from `a_off`, B has `depth` rows of `vectors * lanes` floats from
`b_off`, and C has `rows` rows of `vectors * lanes` floats at stride `ldc`
from `c_off`. Offsets and strides count float32 elements.
"""

import collections
import functools

from llvmlite import ir
from llvmlite import binding as ll
from numba import config, types
from numba.core import cgutils
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic

_F32 = ir.FloatType()
_INDEX = ir.IntType(64)

VectorTarget = collections.namedtuple(
    "VectorTarget", "isa arch cpu lanes registers fma")
VectorTarget.__doc__ = """What the tile compiles for.

isa: "avx512", "avx2" ("avx" without FMA), "sse", "neon" or "portable".
arch: the target triple's architecture; cpu: the CPU name Numba compiles for.
lanes: float32 lanes of a vector register; registers: how many there are.
fma: whether a fused multiply-add is one instruction.
"""


@functools.lru_cache(maxsize=None)
def vector_target():
    """The `VectorTarget` of the code Numba generates in this process.

    The CPU name and features are Numba's (`numba.core.codegen.CPUCodegen`
    reads them the same way: `NUMBA_CPU_NAME`, `NUMBA_CPU_FEATURES`, else the
    host's), so the answer changes exactly when Numba's disk cache key does
    (it holds the same name and features) and cached kernels always match the
    tile shapes of this process. Lanes and FMA come from LLVM itself: it
    compiles a 16-float multiply-add and add for that target (milliseconds).
    """
    cpu = config.CPU_NAME or ll.get_host_cpu_name()
    features = config.CPU_FEATURES
    if features is None:
        features = get_host_cpu_features()
    triple = ll.get_process_triple()
    arch = triple.split("-")[0]
    try:
        asm = _probe_assembly(triple, cpu, features)
    except Exception:  # a target LLVM cannot emit here: the portable tile, no FMA
        return VectorTarget("portable", arch, cpu, 4, 16, False)
    fma = "fmaf" not in asm
    if arch in ("x86_64", "i386", "i686"):
        lanes = 16 if "zmm" in asm else 8 if "ymm" in asm else 4
        registers = 32 if lanes == 16 else 16
        isa = {16: "avx512", 8: "avx2" if fma else "avx", 4: "sse"}[lanes]
    elif arch in ("aarch64", "arm64"):
        lanes, registers, isa = 4, 32, "neon"
    else:
        lanes, registers, isa = 4, 16, "portable"
    return VectorTarget(isa, arch, cpu, lanes, registers, fma)


def _probe_assembly(triple, cpu, features):
    """The assembly of `p[0], p[1] = fma(p[0], p[1], p[2]), p[0] + p[1]` on 16 floats."""
    ll.initialize_native_target()
    ll.initialize_native_asmprinter()
    vector = ir.VectorType(_F32, 16)
    module = ir.Module(name="fusedlstm_vector_probe")
    module.triple = triple
    function = ir.Function(module, ir.FunctionType(ir.VoidType(), [vector.as_pointer()]), "probe")
    builder = ir.IRBuilder(function.append_basic_block())
    pointer = function.args[0]
    values = [builder.load(builder.gep(pointer, [ir.Constant(_INDEX, i)]), align=4)
              for i in range(3)]
    fma = ir.Function(module, ir.FunctionType(vector, [vector] * 3), "llvm.fma.v16f32")
    builder.store(builder.call(fma, values), pointer, align=4)
    # A plain add too, for the widest registers where the multiply-add is a libm call.
    builder.store(builder.fadd(values[0], values[1]),
                  builder.gep(pointer, [ir.Constant(_INDEX, 1)]), align=4)
    builder.ret_void()
    parsed = ll.parse_assembly(str(module))
    parsed.verify()
    machine = ll.Target.from_triple(triple).create_target_machine(
        cpu=cpu, features=features, opt=2)
    return machine.emit_assembly(parsed)


def make_tile(rows, vectors, unroll, lanes=None, fma=None, accumulate=False):
    """A Numba intrinsic `tile(a, a_off, lda, b, b_off, c, c_off, ldc, depth)`.

    Args:
        rows: rows of A and C the tile computes.
        vectors: vectors of `lanes` floats per row of the B panel and of C.
        unroll: independent accumulators per output vector, summed at the end;
            enough in all (`rows * vectors * unroll` >= 8) hides the latency of
            the multiply-adds.
        lanes: floats per vector; `vector_target().lanes` when None.
        fma: fused multiply-adds (`llvm.fma`) rather than a multiply and an
            add; `vector_target().fma` when None.
        accumulate: `C += A @ B` (the accumulators start from C, for sums
            over many products such as the weight gradients) instead of `C = A @ B`.
    """
    target = vector_target()
    lanes = target.lanes if lanes is None else lanes
    fma = target.fma if fma is None else fma

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
            emit = _TileEmitter(builder, rows, vectors, unroll, lanes, fma, a_ptr, lda,
                                b_ptr)
            if accumulate:
                emit.load(c_ptr, ldc)
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

    def __init__(self, builder, rows, vectors, unroll, lanes, fma, a_ptr, lda, b_ptr):
        self.builder = builder
        self.rows, self.vectors, self.unroll, self.lanes = rows, vectors, unroll, lanes
        self.a_ptr, self.lda, self.b_ptr = a_ptr, lda, b_ptr
        self.vector = ir.VectorType(_F32, lanes)
        self.fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(self.vector, [self.vector] * 3),
            f"llvm.fma.v{lanes}f32") if fma else None
        zero = ir.Constant(self.vector, None)
        self.acc = [[[cgutils.alloca_once_value(builder, zero) for _ in range(vectors)]
                     for _ in range(rows)] for _ in range(unroll)]

    def load(self, c_ptr, ldc):
        """Starts the first accumulators from C."""
        builder = self.builder
        for m in range(self.rows):
            c_row = builder.gep(c_ptr, [builder.mul(ir.Constant(_INDEX, m), ldc)])
            for v in range(self.vectors):
                value = self._load_vector(builder.gep(c_row, [ir.Constant(_INDEX, v * self.lanes)]))
                builder.store(value, self.acc[0][m][v])

    def multiply_add(self, k, u):
        builder = self.builder
        width = ir.Constant(_INDEX, self.vectors * self.lanes)
        b_row = builder.gep(self.b_ptr, [builder.mul(k, width)])
        b = [self._load_vector(builder.gep(b_row, [ir.Constant(_INDEX, v * self.lanes)]))
             for v in range(self.vectors)]
        for m in range(self.rows):
            a_index = builder.add(builder.mul(ir.Constant(_INDEX, m), self.lda), k)
            a = self._splat(builder.load(builder.gep(self.a_ptr, [a_index])))
            for v in range(self.vectors):
                slot = self.acc[u][m][v]
                builder.store(self._multiply_add(a, b[v], builder.load(slot)), slot)

    def _multiply_add(self, a, b, c):
        builder = self.builder
        if self.fma is not None:
            return builder.call(self.fma, [a, b, c])
        # No fast-math flags: LLVM keeps the two roundings and does not turn
        # them back into `llvm.fma`, which would be libm calls here.
        return builder.fadd(builder.fmul(a, b), c)

    def store(self, c_ptr, ldc):
        builder = self.builder
        for m in range(self.rows):
            c_row = builder.gep(c_ptr, [builder.mul(ir.Constant(_INDEX, m), ldc)])
            for v in range(self.vectors):
                total = builder.load(self.acc[0][m][v])
                for u in range(1, self.unroll):
                    total = builder.fadd(total, builder.load(self.acc[u][m][v]))
                target = builder.gep(c_row, [ir.Constant(_INDEX, v * self.lanes)])
                builder.store(total, builder.bitcast(target, self.vector.as_pointer()), align=4)

    def _load_vector(self, pointer):
        return self.builder.load(self.builder.bitcast(pointer, self.vector.as_pointer()), align=4)

    def _splat(self, scalar):
        builder = self.builder
        one = builder.insert_element(ir.Constant(self.vector, ir.Undefined), scalar,
                                     ir.Constant(ir.IntType(32), 0))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), self.lanes), None)
        return builder.shuffle_vector(one, ir.Constant(self.vector, ir.Undefined), mask)
