"""A performance model of the fused CUDA kernels and of cuDNN on an H100 SXM.

This is a model, not a measurement: no GPU has run these kernels. It reads
the SASS report (`python benchmarks/gpu/sass.py`, default
`benchmarks/results/sass-sm_90.json`) for the instruction counts of the
kernels' inner loops, replays the host launcher's choice of grid
(`kernels/cuda/launch.py`), and predicts microseconds per timestep, forward and
backward, for N in {1, 16, 64, 256} and H in {256, 512, 1024}:

    python benchmarks/gpu/model.py [--sass PATH] [--out benchmarks/results/]

writes `gpu-model-h100.json` and `gpu-model-h100.md` there.

The fused step (one cooperative launch, a grid barrier per step):

    step = barrier + latency + max(issue, L2)

- barrier: `GRID_BARRIER_US`, published figures for a Hopper
  `grid.sync()` (1-3 us; DESIGN.md section 8); not measured.
- latency: one L2 round trip after the barrier for the staged rows, one for
  the inputs of the cell math (`STEP_LATENCY_US`).
- issue: the busiest SM's warp instructions (busy warps: the hot loop per
  `_CHUNK` columns and the staging loop, both from the SASS, plus shuffles
  and cell math per round; idle warps: staging and barriers) over its 4
  schedulers; at least 2 cycles per instruction of one warp (its dependent
  loads); and at least one cycle per warp-wide shared-memory or L1 access
  (128 bytes per cycle per SM).
- L2: weights that do not fit in shared memory, re-read every round, plus
  the staged rows of h (backward: of the gate gradients), at `L2_TBPS`.

The cuDNN step (its standard algorithm: one GEMM plus one pointwise kernel per
step, what TF and PyTorch run for fp32 at H >= 256):

    step = CUDNN_STEP_FLOOR_US + max(GEMM FLOPs / rate, weight bytes / L2)

- floor: about 7 us per layer-step at small sizes (DESIGN.md section 6,
  cuDNN's standard algorithm measured at 6.8 us per step where its
  persistent variant took 0.66-0.88 us).
- rate: FP32 FFMA peak of an H100 SXM (67 TFLOPS, NVIDIA H100 datasheet) at
  `GEMM_EFFICIENCY`; the TF32 column uses the dense TF32 tensor-core peak
  (494 TFLOPS) at the same efficiency. TF and PyTorch allow TF32 in cuDNN
  by default on Hopper. Cross-check: DeepBench's fp32 forward on a V100
  (15.7 TFLOPS) took 30-130 us per step for H 256-1024, N 16-128.
- backward: the data-gradient GEMM per step plus the weight-gradient GEMM
  (one call over all steps, counted per step) on top of the same floor.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SASS = ROOT / "benchmarks" / "results" / "sass-sm_90.json"
DEFAULT_OUT = ROOT / "benchmarks" / "results"
BATCHES = (1, 16, 64, 256)
UNITS = (256, 512, 1024)

# H100 SXM5 (NVIDIA datasheet and whitepaper): 132 SMs, 4 schedulers per SM.
SMS = 132
SCHEDULERS = 4
CLOCK_GHZ = 1.755  # sustained under load; the boost clock is 1.98 GHz
FP32_TFLOPS = 67.0
TF32_TFLOPS = 494.0
L2_TBPS = 5.5  # microbenchmarks of H100 L2 reads; the datasheet gives none
GRID_BARRIER_US = 2.0
STEP_LATENCY_US = 1.0
CYCLES_PER_WARP_INSTRUCTION = 2.0
LSU_WAVEFRONTS_PER_CYCLE = 1.0  # 128 bytes per cycle per SM, shared memory and L1
CUDNN_STEP_FLOOR_US = 7.0
GEMM_EFFICIENCY = 0.6

# Instruction counts outside the inner loops and the staging loop (both read
# from the SASS), per warp, estimated from the device functions: per chunk
# (two block barriers and the loop set-up), per shuffle stage of the
# butterfly (16 sums: a shuffle and an add each), per round (hand-off of the
# sums through shared memory, forward cell math for the warp's rows, all in
# parallel) and per backward cell.
CHUNK_OVERHEAD = 30
SHUFFLE_STAGE = 32
ROUND_FORWARD = 300
ROUND_BACKWARD = 60
CELL_BACKWARD = 80

# The launch the host driver uses by default (`kernels/cuda/drivers.py`).
THREADS = 256
LANES = 32
WARP = 32
ROWS = 4
CHUNK = 128
STAGE_TILES = 8
WEIGHT_FLOATS = 12 * 1024 - 256 - 32 * 128
BLOCKS_PER_SM = 2


def grid(H):
    """The launcher's `(units, blocks)` for a cooperative launch (`_grid_shape`)."""
    fit = max(1, WEIGHT_FLOATS * 10 // (36 * H))
    spread = -(-H // SMS)
    units = max(min(fit, spread), -(-H // (SMS * BLOCKS_PER_SM)))
    return units, -(-H // units)


def rounds(N, tiles, lanes):
    """`(rounds, row tiles per round, busy warps per round)` (`_round_shape`)."""
    groups = THREADS // lanes
    row_tiles = -(-N // ROWS)
    per_round = max(1, min(groups // max(1, tiles), STAGE_TILES, row_tiles))
    per_round_units = min(tiles, groups)
    busy_warps = -(-per_round * per_round_units * lanes // WARP)
    return (-(-row_tiles // per_round) * -(-tiles // per_round_units), per_round, busy_warps)


def loop_cost(sass, kernel, streamed_fraction):
    """Instructions of one pass of the inner loop (one `_CHUNK`) per warp."""
    entry = sass["kernels"][kernel]
    hot, streamed = entry["hot_loop"], entry["streamed_loop"]
    return ((1 - streamed_fraction) * hot["instructions"]
            + streamed_fraction * streamed["instructions"])


def _products(sass, kernel, N, H, width_tiles, streamed, chunks, lanes):
    """Warp instructions of a block's recurrent products in one step.

    Returns `(busy, idle)`: per busy warp (inner loop, staging, butterflies,
    hand-off) and per idle warp (staging and barriers only).
    """
    count, per_round, busy_warps = rounds(N, width_tiles, lanes)
    trips = CHUNK / lanes / 4  # passes of the 4-trip unrolled loop per chunk
    staging = sass["kernels"][kernel]["staging_loop"]["instructions"]
    stage = per_round * ROWS * CHUNK / THREADS * staging
    butterfly = SHUFFLE_STAGE * max(0, (lanes - 1).bit_length())
    busy = count * (chunks * (trips * loop_cost(sass, kernel, streamed) + CHUNK_OVERHEAD + stage)
                    + butterfly)
    idle = count * chunks * (CHUNK_OVERHEAD + stage)
    # Shared-memory and L1 wavefronts (one per warp-wide 4-byte load or store):
    # the inner loop's loads in busy warps, a load and a store per staged element.
    hot = sass["kernels"][kernel]["hot_loop"]
    loads = hot["shared_loads"] + hot["global_loads"]
    wavefronts = (busy_warps * count * chunks * trips * loads
                  + THREADS // WARP * count * chunks * 2 * per_round * ROWS * CHUNK / THREADS)
    return busy, idle, count, busy_warps, wavefronts


def fused_forward_us(sass, N, H, lanes=LANES):
    units, blocks = grid(H)
    cached_k = min(H, WEIGHT_FLOATS // (4 * units))
    streamed = (H - cached_k) / H
    busy, idle, count, busy_warps, wavefronts = _products(
        sass, "lstm_forward_persistent", N, H, units, streamed, -(-H // CHUNK), lanes)
    busy += count * ROUND_FORWARD
    l2_bytes = 4 * (4 * H * (H - cached_k) * -(-N // ROWS) + blocks * N * H + 5 * N * H)
    step, bound = _step_us(busy, idle, busy_warps, wavefronts, blocks, l2_bytes)
    return step, dict(
        bound=bound, units=units, blocks=blocks, cached_k=cached_k, rounds=count,
        busy_warps=busy_warps,
        busy_warp_instructions=round(busy))


def fused_backward_us(sass, N, H, lanes=LANES):
    units, blocks = grid(H)
    cached_c = min(4 * H, WEIGHT_FLOATS // units)
    streamed = (4 * H - cached_c) / (4 * H)
    busy, idle, count, busy_warps, wavefronts = _products(
        sass, "lstm_backward_persistent", N, H, -(-units // 4), streamed, 4 * -(-H // CHUNK),
        lanes)
    cells = -(-N * units // THREADS) * CELL_BACKWARD
    busy += count * ROUND_BACKWARD + cells
    idle += cells
    l2_bytes = 4 * (units * (4 * H - cached_c) * blocks * -(-N // ROWS)
                    + blocks * N * 4 * H + 12 * N * H)
    step, bound = _step_us(busy, idle, busy_warps, wavefronts, blocks, l2_bytes)
    return step, dict(
        bound=bound, units=units, blocks=blocks, cached_c=cached_c, rounds=count,
        busy_warps=busy_warps,
        busy_warp_instructions=round(busy))


def _step_us(busy, idle, busy_warps, wavefronts, blocks, l2_bytes):
    """Barrier, latency, and the slowest of the busiest SM's instruction issue,
    its shared-memory/L1 wavefronts (`LSU_WAVEFRONTS_PER_CYCLE`) and L2."""
    blocks_per_sm = -(-blocks // SMS)
    warps = THREADS // WARP
    per_sm = blocks_per_sm * (busy_warps * busy + (warps - busy_warps) * idle)
    terms = {
        "issue": max(per_sm / SCHEDULERS, busy * CYCLES_PER_WARP_INSTRUCTION) / (CLOCK_GHZ * 1e3),
        "shared memory": blocks_per_sm * wavefronts / LSU_WAVEFRONTS_PER_CYCLE / (CLOCK_GHZ * 1e3),
        "L2": l2_bytes / (L2_TBPS * 1e6),
    }
    bound = max(terms, key=terms.get)
    return GRID_BARRIER_US + STEP_LATENCY_US + terms[bound], bound


def cudnn_forward_us(N, H, tflops):
    flops = 2 * N * H * 4 * H
    return CUDNN_STEP_FLOOR_US + max(flops / (GEMM_EFFICIENCY * tflops * 1e6),
                                     16 * H * H / (L2_TBPS * 1e6))


def cudnn_backward_us(N, H, tflops):
    flops = 2 * (2 * N * H * 4 * H)
    return CUDNN_STEP_FLOOR_US + max(flops / (GEMM_EFFICIENCY * tflops * 1e6),
                                     2 * 16 * H * H / (L2_TBPS * 1e6))


def model(sass):
    rows = []
    for H in UNITS:
        for N in BATCHES:
            forward, fwd_grid = fused_forward_us(sass, N, H)
            backward, bwd_grid = fused_backward_us(sass, N, H)
            rows.append({
                "N": N, "H": H,
                "fused_forward_us": round(forward, 2),
                "fused_backward_us": round(backward, 2),
                "cudnn_fp32_forward_us": round(cudnn_forward_us(N, H, FP32_TFLOPS), 2),
                "cudnn_tf32_forward_us": round(cudnn_forward_us(N, H, TF32_TFLOPS), 2),
                "cudnn_fp32_backward_us": round(cudnn_backward_us(N, H, FP32_TFLOPS), 2),
                "cudnn_tf32_backward_us": round(cudnn_backward_us(N, H, TF32_TFLOPS), 2),
                "forward_grid": fwd_grid, "backward_grid": bwd_grid,
            })
    for row in rows:
        row["forward_ratio_fp32"] = round(row["fused_forward_us"] / row["cudnn_fp32_forward_us"],
                                          2)
        row["forward_ratio_tf32"] = round(row["fused_forward_us"] / row["cudnn_tf32_forward_us"],
                                          2)
        row["backward_ratio_fp32"] = round(
            row["fused_backward_us"] / row["cudnn_fp32_backward_us"], 2)
        row["floor_ratio"] = round((GRID_BARRIER_US + STEP_LATENCY_US)
                                   / row["cudnn_fp32_forward_us"], 2)
        row["target"] = forward_target(row["N"], row["H"])
        row["meets_target"] = None if row["target"] is None else (
            row["forward_ratio_fp32"] <= row["target"])
    return rows


def forward_target(N, H):
    """Issue 10's target for the modelled forward step, as a fraction of cuDNN's."""
    if N <= 16 and H <= 512:
        return 0.5
    if N == 64:
        return 1.0
    return None


def constants():
    names = ("SMS", "SCHEDULERS", "CLOCK_GHZ", "FP32_TFLOPS", "TF32_TFLOPS", "L2_TBPS",
             "GRID_BARRIER_US", "STEP_LATENCY_US", "CYCLES_PER_WARP_INSTRUCTION",
             "LSU_WAVEFRONTS_PER_CYCLE",
             "CUDNN_STEP_FLOOR_US", "GEMM_EFFICIENCY", "CHUNK_OVERHEAD",
             "SHUFFLE_STAGE", "ROUND_FORWARD", "ROUND_BACKWARD", "CELL_BACKWARD", "LANES")
    return {name: globals()[name] for name in names}


def markdown(rows, sass_path, sass):
    hot = {name: sass["kernels"][name]["hot_loop"]
           for name in ("lstm_forward_persistent", "lstm_backward_persistent")}
    lines = [
        "# Model (a prediction, not a measurement): fused CUDA kernels vs cuDNN, H100 SXM",
        "",
        f"Microseconds per timestep, fp32. Inputs: `{sass_path.name}` (hot loops: forward "
        f"{hot['lstm_forward_persistent']['instructions']} instructions / "
        f"{hot['lstm_forward_persistent']['ffma']} FFMA, backward "
        f"{hot['lstm_backward_persistent']['instructions']} / "
        f"{hot['lstm_backward_persistent']['ffma']}), the constants below, and the "
        "sources in `benchmarks/gpu/model.py`. Ratio = fused / cuDNN fp32; target from "
        "issue 10 (<= 0.5 at N <= 16 and H <= 512, <= 1.0 at N = 64).",
        "",
        "Bound: the largest term of the fused forward step after the fixed "
        f"{GRID_BARRIER_US + STEP_LATENCY_US:.1f} us of grid barrier and latency; floor ratio: "
        "that fixed part alone over cuDNN's step (no kernel can go below it).",
        "",
        "| H | N | fused fwd | cuDNN fwd fp32 | cuDNN fwd TF32 | ratio fp32 | target | bound | "
        "floor ratio | fused bwd | cuDNN bwd fp32 | ratio bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "-" if r["target"] is None else (
            f"<= {r['target']} {'met' if r['meets_target'] else 'MISSED'}")
        lines.append(
            f"| {r['H']} | {r['N']} | {r['fused_forward_us']:.1f} | "
            f"{r['cudnn_fp32_forward_us']:.1f} | {r['cudnn_tf32_forward_us']:.1f} | "
            f"{r['forward_ratio_fp32']:.2f} | {target} | {r['forward_grid']['bound']} | "
            f"{r['floor_ratio']:.2f} | {r['fused_backward_us']:.1f} | "
            f"{r['cudnn_fp32_backward_us']:.1f} | {r['backward_ratio_fp32']:.2f} |")
    lines += ["", "Constants: " + ", ".join(f"{k}={v}" for k, v in constants().items()), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sass", type=Path, default=DEFAULT_SASS,
                        help="the SASS report to read (python benchmarks/gpu/sass.py)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the results")
    args = parser.parse_args(argv)
    sass = json.loads(args.sass.read_text())
    rows = model(sass)
    text = markdown(rows, args.sass, sass)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-model-h100.json").write_text(json.dumps(
        {"kind": "model (prediction, no GPU measurement)", "sass_report": args.sass.name,
         "sass_tools": sass.get("tools"), "constants": constants(), "rows": rows},
        indent=1) + "\n")
    (args.out / "gpu-model-h100.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
