"""Where the fused layer's CPU time goes, per shape: the layer, its kernels, and the rest.

On the CPU one driver call per direction owns the whole layer (input projection,
recurrence, every gradient), so the layer's time is the kernels' plus what the
framework spends around them. Three figures per shape and mode, each measured once,
in one process (`--framework fusedlstm`, TensorFlow backend, no mask, no dropout):

- `layer`: the fused layer in a `tf.function`: the forward pass, or (train) the
  forward and backward passes, the outputs' gradient given (`output_gradients`);
- `kernel`: the drivers `fusedlstm.kernels.cpu.drivers.forward` (and `backward`) on
  NumPy arrays holding the same problem, on one thread and on all of them;
- `outside_kernel`: the layer again, with every reference to the drivers replaced by
  stubs returning their results, computed beforehand: the per-call overhead outside
  the kernels, timed directly rather than as a difference of two noisy times. The
  stubs count their calls: one forward (and, in training, one backward) call per
  layer call, as the layer promises.

`kernel_report.py` sets them side by side with the GFLOP/s of the kernels against the
machine's peak sgemm (`test_cpu_gemm.py`).
"""

import contextlib
import sys

import pytest

import cases

THREADS = {"1thread": 1, "all_threads": None}  # None: the kernels' own thread count


def part(benchmark, shape, mode, name, run, **info):
    benchmark.group = f"{shape}/breakdown"
    benchmark.name = "/".join([mode, name] + [str(v) for v in info.values()])
    benchmark.extra_info.update(kind="breakdown", shape=shape, mode=mode, part=name,
                                NTCH=cases.SHAPES[shape],
                                flops=cases.layer_flops(cases.SHAPES[shape], mode), **info)
    benchmark.pedantic(run, rounds=cases.ROUNDS, warmup_rounds=cases.WARMUP_ROUNDS,
                       iterations=1)


@pytest.fixture(scope="module", params=sorted(cases.SHAPES))
def problem(request, framework):
    if framework != "fusedlstm":
        pytest.skip("the breakdown is of the fused layer (--framework fusedlstm)")
    cases.load_fused_kernels()
    return request.param, cases.KernelProblem(request.param)


def make_layer_step(shape, mode, d_outputs):
    """The fused layer at `shape` in a `tf.function`: forward, or forward and backward
    with `d_outputs` as the outputs' gradient; returns NumPy arrays."""
    import tensorflow as tf

    import fusedlstm

    layer, x, _, _ = cases.keras_layer(fusedlstm.LSTM, cases.SHAPES[shape], "plain")
    x_t, d_outputs_t = tf.constant(x), tf.constant(d_outputs)

    @tf.function
    def forward():
        return layer(x_t, training=False)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            y = layer(x_t, training=True)
        return tape.gradient(y, layer.trainable_weights, output_gradients=d_outputs_t)

    step = train_step if mode == "train" else forward
    return lambda: tf.nest.map_structure(lambda t: t.numpy(), step())


@pytest.mark.parametrize("mode", cases.MODES)
def test_layer(benchmark, problem, mode):
    shape, p = problem
    part(benchmark, shape, mode, "layer", make_layer_step(shape, mode, p.d_outputs))


@pytest.mark.parametrize("threads", sorted(THREADS))
@pytest.mark.parametrize("mode", cases.MODES)
def test_kernel(benchmark, problem, mode, threads):
    from fusedlstm.kernels.cpu.threads import set_thread_count, thread_count

    shape, p = problem
    set_thread_count(THREADS[threads])
    try:
        run = p.train_step if mode == "train" else lambda: p.forward(training=False)
        part(benchmark, shape, mode, "kernel", run, threads=threads, thread_count=thread_count())
    finally:
        set_thread_count(None)


@pytest.mark.parametrize("mode", cases.MODES)
def test_outside_kernel(benchmark, problem, mode):
    shape, p = problem
    step = make_layer_step(shape, mode, p.d_outputs)
    step()  # traced with the real drivers
    with stubbed_drivers(p) as calls:
        step()
        want = {"forward": 1, "backward": 1 if mode == "train" else 0}
        assert calls == want, f"one layer call made driver calls {calls}; expected {want}"
        part(benchmark, shape, mode, "outside_kernel", step)


@contextlib.contextmanager
def stubbed_drivers(p):
    """Replaces every reference to the drivers `forward` and `backward` in fusedlstm's
    modules with stubs that return `p`'s results, computed here by the real drivers.

    Yields:
        {"forward": calls, "backward": calls}: how often each stub was called.
    """
    from fusedlstm.kernels.cpu import drivers

    results = {training: p.forward(training) for training in (False, True)}
    gradients = p.backward(results[True][3])
    calls = {"forward": 0, "backward": 0}

    def forward(*args, **kwargs):
        calls["forward"] += 1
        return results[bool(args[12] if len(args) > 12 else kwargs["training"])]

    def backward(*args, **kwargs):
        calls["backward"] += 1
        return gradients

    stubs = {drivers.forward: forward, drivers.backward: backward}
    replaced = [(module, name, stubs[value]) for module in list(sys.modules.values())
                if getattr(module, "__name__", "").startswith("fusedlstm")
                for name, value in list(vars(module).items())
                if value is drivers.forward or value is drivers.backward]
    originals = [getattr(module, name) for module, name, _ in replaced]
    for module, name, stub in replaced:
        setattr(module, name, stub)
    try:
        yield calls
    finally:
        for (module, name, _), original in zip(replaced, originals):
            setattr(module, name, original)
