"""The CPU kernels on this platform, with NumPy and Numba only: no Keras, no framework.

    python tests/platforms/kernel_check.py            # kernels against the float64 reference
    python tests/platforms/kernel_check.py --asm      # the register tile's assembly (x86)

Run from the repository root (or anywhere: the package is found next to this
file). It loads `fusedlstm.kernels` and `fusedlstm.testing.reference` through
a shim `fusedlstm` package, so the layer (and Keras) is never imported; that is
what runs on machines where no framework is installed, for example an AArch64
root under qemu (`tests/platforms/aarch64_root.sh`), and under
`NUMBA_CPU_NAME` / `NUMBA_CPU_FEATURES` for another x86 ISA
(`tests/test_kernels_cpu.py` runs it so, with a cache folder of its own).

The kernels' forward and backward results at (N, T, H) = (1, 7, 3), (5, 9, 17)
(masked, input and recurrent dropout) and (16, 20, 64) are compared with the
float64 reference within the error model of `tests/parity.py` (`allowance`).
Prints one line per result, then PASS or FAIL; the
exit status is 0 only on PASS. `--json` prints one JSON object instead.
"""

import argparse
import importlib.util
import json
import os
import platform
import re
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = ((1, 7, 3), (5, 9, 17), (16, 20, 64))


def load_kernels():
    """Imports `fusedlstm.kernels` without running `fusedlstm/__init__.py` (which loads
    Keras): a bare `fusedlstm` package, and `kernels/` loaded under the name
    `fusedlstm.kernels` (as setup.py's package_dir maps it). In a process that has
    imported the real package already, that one is used."""
    if "fusedlstm" not in sys.modules:
        package = types.ModuleType("fusedlstm")
        package.__path__ = [os.path.join(ROOT, "fusedlstm")]
        sys.modules["fusedlstm"] = package
        spec = importlib.util.spec_from_file_location(
            "fusedlstm.kernels", os.path.join(ROOT, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(ROOT, "kernels")])
        kernels = importlib.util.module_from_spec(spec)
        sys.modules["fusedlstm.kernels"] = package.kernels = kernels
        spec.loader.exec_module(kernels)
    from fusedlstm.kernels import cpu, gates  # noqa: F401
    from fusedlstm.kernels.cpu import panels  # noqa: F401
    return sys.modules["fusedlstm.kernels"]


def target_description():
    """The vector target the tiles were chosen for, and the panel layout."""
    load_kernels()
    from fusedlstm.kernels.cpu import panels
    return dict(panels.TARGET._asdict(), panel=panels.PANEL, tiles=[
        [rows, panels.VECTORS, unroll] for rows, unroll in panels.TILE_SHAPES])


def allowance(want, terms):
    """The error model of `tests/parity.py` (`float32_rounding_allowance`): float32
    rounding of a sum of `terms` products, eps32 * (8 + 2 * sqrt(terms)) * max(1, max|want|)."""
    import numpy as np
    return float(np.finfo("float32").eps * (8 + 2 * np.sqrt(terms))
                 * max(1.0, float(np.abs(want).max(initial=0))))


def summed_terms(name, N, T, C, H):
    """The depth of the deepest sum behind a result, as `tests/parity.py` counts it:
    C + H products per step for the forward values, 4H per step back for the
    input and state gradients, N * T rows more for the weight gradients."""
    backward_chain = T * 4 * H
    if name in ("d_kernel", "d_recurrent_kernel", "d_bias"):
        return N * T + backward_chain
    if name.startswith("d_"):
        return backward_chain
    return T * (C + H + 1)


def kernel_errors(N, T, H, masked, seed=1, C=4):
    """{result name: (max abs error, bound)} of the CPU kernels against the float64
    reference; `masked` adds a mask and input and recurrent dropout."""
    import numpy as np
    kernels = load_kernels()
    from fusedlstm.testing import reference
    cpu, gates = kernels.cpu, kernels.gates
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, T, C)).astype("float32")
    W = rng.normal(0, 0.5, (C, 4 * H)).astype("float32")
    U = rng.normal(0, 0.5, (H, 4 * H)).astype("float32")
    b = rng.normal(0, 0.5, 4 * H).astype("float32")
    h0, c0 = (rng.normal(size=(N, H)).astype("float32") for _ in range(2))
    mask = rng.random((N, T)) > 0.3 if masked else None
    rmask = (rng.random((4, N, H)) > 0.3).astype("float32") / 0.7 if masked else None
    imask = (rng.random((4, N, C)) > 0.2).astype("float32") / 0.8 if masked else None
    seq, h, c, tape = reference.lstm_forward(x, W, U, b, h0, c0, mask, rmask, imask)
    out, h_n, c_n, saved = cpu.forward(x, W, b, U, h0, c0, mask, imask, rmask, gates.TANH,
                                       gates.SIGMOID, False, True)
    d_seq = rng.normal(size=seq.shape).astype("float32")
    d_h, d_c = (rng.normal(size=h.shape).astype("float32") for _ in range(2))
    want = reference.lstm_backward(tape, d_seq, d_h, d_c)
    grads = cpu.backward(x, W, U, mask, imask, rmask, gates.TANH, gates.SIGMOID, False, saved,
                         d_seq, d_h, d_c)
    got = {"outputs": (out, seq), "h_n": (h_n, h), "c_n": (c_n, c)}
    for name, value in zip(("x", "kernel", "recurrent_kernel", "bias", "h0", "c0"), grads):
        got["d_" + name] = (value, want[name])
    return {name: (float(np.abs(np.asarray(g, np.float64) - w).max()),
                   allowance(w, summed_terms(name, N, T, C, H)))
            for name, (g, w) in got.items()}


def tile_assembly():
    """What the register tiles compile to on this target, in the function that runs
    them (`panels.panel_products`) and alone (one function per tile shape, storing
    and accumulating).

    Returns a dict: `fma` multiply-adds by register class (x86 "x", "y", "z";
    AArch64 "v"), `fmaf_calls` (libm calls), `mul_add` separate vector
    multiplies, and for the innermost loops that hold multiply-adds (or
    multiplies): their count and their stack accesses (spills and reloads)."""
    import numpy as np
    from numba import njit
    load_kernels()
    from fusedlstm.kernels.cpu import panels
    rows = sum(r for r, _ in panels.TILE_SHAPES)
    depth, width = 5, panels.PANEL
    listings = {}
    a = np.ones((rows, depth), "float32")
    b = np.ones(depth * width, "float32")
    c = np.zeros((rows, width), "float32")
    # A copy without the disk cache: a function loaded from the cache has no listing.
    products = njit(nogil=True, error_model="numpy")(panels.panel_products.py_func)
    products(a, 0, 0, depth, rows, depth, b, 0, 0, 0, 1, c, 0, width, 1)
    if not np.all(c == depth):
        raise AssertionError("panel_products computed a wrong product")
    listings["panel_products"] = "\n".join(products.inspect_asm().values())
    for tiles, kind in ((panels.TILES, ""), (panels.ACCUMULATING_TILES, "_accumulating")):
        for (rows, unroll), tile in zip(panels.TILE_SHAPES, tiles):
            function = _tile_function(njit, tile)
            function(np.ones((rows, depth), "float32"), np.ones(depth * width, "float32"),
                     np.zeros((rows, width), "float32"))
            listings[f"tile_{rows}x{panels.VECTORS}x{unroll}{kind}"] = "\n".join(
                function.inspect_asm().values())
    return {name: _assembly_counts(asm) for name, asm in listings.items()}


def _tile_function(njit, tile):
    def run(a, b, c):
        tile(a, 0, a.shape[1], b, 0, c, 0, c.shape[1], a.shape[1])
    return njit(run)


_MULTIPLY_ADD = re.compile(r"\bv?fmadd\w*p[sd]\b|\bfmla\b|\bv?mulps\b")
_STACK = re.compile(r"\(%rsp\)|\(%rbp\)|\[sp\b|\[x29\b")


def _assembly_counts(asm):
    lines = asm.splitlines()
    fma = {k: len(re.findall(r"\bvfmadd\w*ps\s+[^\n]*%" + k + "mm", asm)) for k in "xyz"}
    fma["v"] = len(re.findall(r"\bfmla\s+v\d+\.4s", asm))
    loops = [loop for loop in innermost_loops(lines)
             if any(_MULTIPLY_ADD.search(line) for line in loop)]
    return {
        "fma": fma,
        "fmaf_calls": len(re.findall(r"\bfmaf\b", asm)),
        "mul_add": len(re.findall(r"\bv?mulps\b", asm)),
        "loops": len(loops),
        "stack_in_loops": sum(1 for loop in loops for line in loop if _STACK.search(line)),
        "vector_stack_in_loops": sum(1 for loop in loops for line in loop if _STACK.search(line)
                                     and re.search(r"%[xyz]mm|\b[qv]\d+\b", line)),
    }


def innermost_loops(lines):
    """The innermost loops of an assembly listing: lines from a label to a jump back to it
    that hold no other such loop (x86 `jXX .L`, AArch64 `b.XX .L` / `cbnz`)."""
    labels, found = {}, []
    for index, line in enumerate(lines):
        label = re.match(r"^(\.?\w+):", line)
        if label:
            labels[label.group(1)] = index
        jump = re.match(r"^\s+(?:j\w+|b\.\w+|b|cbn?z\s+\w+,|tbn?z\s+\w+,\s*#\d+,)\s+(\.?\w+)$",
                        line)
        if jump and jump.group(1) in labels:
            found.append((labels[jump.group(1)], index))
    inner = [(a, b) for a, b in found
             if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in found)]
    return [lines[a:b + 1] for a, b in inner]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--asm", action="store_true", help="report the tile's assembly instead")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    start = time.perf_counter()
    report = {"machine": platform.machine(), "python": platform.python_version(),
              "target": target_description()}
    if args.asm:
        report["assembly"] = tile_assembly()
        ok = True
    else:
        report["cases"] = []
        ok = True
        for N, T, H in SHAPES:
            case_start = time.perf_counter()
            errors = kernel_errors(N, T, H, masked=N == 5)
            passed = all(e <= b for e, b in errors.values())
            ok = ok and passed
            report["cases"].append({"shape": [N, T, H], "masked": N == 5, "pass": passed,
                                    "seconds": round(time.perf_counter() - case_start, 1),
                                    "errors": errors})
            if not args.json:
                worst = max(errors, key=lambda k: errors[k][0] / errors[k][1])
                forward = max(errors[k][0] for k in ("outputs", "h_n", "c_n"))
                backward = max(e for k, (e, _) in errors.items() if k.startswith("d_"))
                print(f"(N,T,H)=({N},{T},{H}){' masked' if N == 5 else ''}: "
                      f"{'PASS' if passed else 'FAIL'} in {time.perf_counter() - case_start:.1f} s;"
                      f" max error forward {forward:.2e}, backward {backward:.2e}; worst {worst}"
                      f" {errors[worst][0]:.2e} <= {errors[worst][1]:.2e}", flush=True)
    report["pass"] = ok
    report["seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['machine']} python {report['python']} target {report['target']}")
        if args.asm:
            for name, counts in report["assembly"].items():
                print(f"{name}: {counts}")
        print(("PASS" if ok else "FAIL") + f" in {report['seconds']} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
