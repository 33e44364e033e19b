"""`python -m fusedlstm demo`: one forecasting model trained with both layers.

The data is the Mauna Loa CO2 series that statsmodels ships (weekly, 1958 to
2001), averaged to months. The model sees `window` months and predicts the
next one. Each window is expressed relative to its last value, in units of the
training months' typical month-to-month change, so the model learns the
seasonal shape rather than the level, which keeps rising past anything seen in
training.
"""

import time

import keras
import numpy as np

import fusedlstm
from fusedlstm.cli.environment import (device_scope, fused_backend_problem, require_module,
                                   resolve_device)
from fusedlstm.cli.errors import CliError

TRAIN_FRACTION = 0.8
PLOTTED_TRAINING_MONTHS = 120
LAYERS = {"keras": ("keras.layers.LSTM", keras.layers.LSTM),
          "fused": ("fusedlstm.LSTM", fusedlstm.LSTM)}
LEARNING_RATE = 3e-3


def run_demo(epochs, units, window, batch_size, seed, png_path, device="auto"):
    """Trains the model with `keras.layers.LSTM`, then with `fusedlstm.LSTM`.

    Both start from the same weights and see the batches in the same order.
    Prints Keras's progress bar per epoch, then both loss curves and the time
    per epoch side by side and the test error of each forecast, and draws the
    forecast against the truth and both loss curves to `png_path`.

    Returns:
        0.
    """
    for module in ("statsmodels", "matplotlib"):
        require_module(module, "the demo")
    problem = fused_backend_problem()
    if problem:
        raise CliError(problem)
    on_gpu = resolve_device(device)
    dates, co2 = load_co2_monthly()
    split = int(len(co2) * TRAIN_FRACTION)
    if split <= window:
        raise CliError(f"--window {window} leaves no training data: the series has "
                       f"{len(co2)} months, {split} of them for training")
    scale = float(np.std(np.diff(co2[:split])))
    x, y = make_windows(co2, window, scale)
    train_rows, test_rows = slice(0, split - window), slice(split - window, None)
    print(f"Mauna Loa CO2, {len(co2)} months from {dates[0]:%Y-%m} to {dates[-1]:%Y-%m}: "
          f"{split} for training, {len(co2) - split} for testing; {window}-month windows")

    results = {}
    keras.utils.set_random_seed(seed)
    initial_weights = build_model(keras.layers.LSTM, window, units).get_weights()
    with device_scope(on_gpu):
        for name, (label, layer_class) in LAYERS.items():
            print(f"\nTraining with {label}")
            model = build_model(layer_class, window, units)
            model.set_weights(initial_weights)
            keras.utils.set_random_seed(seed)
            losses, seconds = train(model, x[train_rows], y[train_rows], epochs, batch_size)
            predicted = model.predict(x[test_rows], verbose=0)[:, 0]
            forecast = co2[split - 1:-1] + predicted * scale
            results[name] = {"losses": losses, "seconds": seconds, "forecast": forecast}

    print()
    print(format_training(results))
    print()
    print(format_errors(results, co2[split:], co2[split - 1:-1]))
    plot_demo(png_path, dates, co2, split, results)
    print(f"\nWrote {png_path}")
    return 0


def load_co2_monthly():
    """Monthly mean CO2 (ppm) at Mauna Loa, from statsmodels (no download).

    Returns:
        `(dates, values)`: a `DatetimeIndex` and a float32 array; the weeks
        statsmodels lacks are interpolated.
    """
    from statsmodels.datasets import co2

    series = co2.load_pandas().data["co2"].resample("MS").mean().interpolate()
    return series.index, series.to_numpy("float32")


def make_windows(values, window, scale):
    """Inputs `[n, window, 1]` and targets `[n, 1]` relative to each window's last value.

    Window `k` holds `values[k:k + window]` and its target is
    `values[k + window]`, both minus `values[k + window - 1]` and divided by
    `scale`.
    """
    starts = np.arange(len(values) - window)
    windows = values[starts[:, None] + np.arange(window)]
    last = windows[:, -1:]
    x = (windows - last) / scale
    y = (values[starts + window, None] - last) / scale
    return x[..., None].astype("float32"), y.astype("float32")


def build_model(layer_class, window, units):
    """`Input((window, 1))` -> `layer_class(units)` -> `Dense(1)`, compiled with Adam and MSE."""
    model = keras.Sequential([
        keras.Input((window, 1)),
        layer_class(units),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss="mse")
    return model


class _EpochTimer(keras.callbacks.Callback):
    """Records the wall time of each epoch."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def train(model, x, y, epochs, batch_size):
    """Fits `model` with Keras's progress bar; returns `(losses, seconds)` per epoch."""
    timer = _EpochTimer()
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size, callbacks=[timer],
                        verbose=1)
    return history.history["loss"], timer.seconds


def format_training(results):
    stock, fused = results["keras"], results["fused"]
    lines = [
        "Training loss (MSE) and seconds per epoch; epoch 1 includes tracing and JIT compile",
        f"{'epoch':>5}  {'keras loss':>11}{'fused loss':>12}  {'keras s':>8}{'fused s':>9}",
    ]
    for epoch, row in enumerate(zip(stock["losses"], fused["losses"],
                                    stock["seconds"], fused["seconds"]), start=1):
        lines.append(f"{epoch:>5}  {row[0]:>11.5f}{row[1]:>12.5f}  {row[2]:>8.2f}{row[3]:>9.2f}")
    return "\n".join(lines)


def format_errors(results, truth, last_month):
    lines = ["Test forecast error, one month ahead (RMSE, ppm)"]
    rows = [(label, results[name]["forecast"]) for name, (label, _) in LAYERS.items()]
    rows.append(("last month (naive)", last_month))
    for label, forecast in rows:
        lines.append(f"  {label:<20}{float(np.sqrt(np.mean((forecast - truth) ** 2))):.3f}")
    return "\n".join(lines)


def plot_demo(path, dates, co2, split, results):
    """Draws the test forecasts against the truth and both loss curves to `path`."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5), layout="constrained")
    forecast_ax, loss_ax = figure.subplots(1, 2, width_ratios=(2, 1))
    shown = slice(max(0, split - PLOTTED_TRAINING_MONTHS), None)
    forecast_ax.plot(dates[shown], co2[shown], color="0.6", linewidth=1, label="truth")
    for (name, (label, _)), style in zip(LAYERS.items(), ("-", "--")):
        forecast_ax.plot(dates[split:], results[name]["forecast"], style,
                         linewidth=1.2, label=f"{label} forecast")
        losses = results[name]["losses"]
        loss_ax.plot(range(1, len(losses) + 1), losses, style, marker="o", label=label)
    forecast_ax.axvline(dates[split], color="0.3", linewidth=0.8, linestyle=":")
    forecast_ax.set_title("Mauna Loa CO2: one-month-ahead forecasts after the training months")
    forecast_ax.set_ylabel("CO2 (ppm)")
    forecast_ax.legend()
    loss_ax.set_title("training loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("MSE (log scale)")
    loss_ax.set_yscale("log")
    loss_ax.legend()
    figure.savefig(path, dpi=100)
