"""`python -m fusedlstm explain --png FILE`: the three weight arrays of an LSTM, drawn.

One panel per LSTM. Each panel draws `kernel` [C, 4H], `recurrent_kernel`
[H, 4H] and `bias` [4H] to scale (one square per weight, the same size in all
three), the four gate blocks i, f, c, o coloured and labelled, with the shapes,
the parameter arithmetic 4 * ((C + H) * H + H) and a note that the sequence
length appears nowhere.
"""

from fusedlstm.cli.explain import GATES, param_arithmetic

GATE_COLORS = ("#5B8DC9", "#F29E4C", "#6AB46A", "#E0706E")
NAMES_INCHES = 2.7
ARRAYS_WIDTH_INCHES = 6.0
COUNTS_INCHES = 3.6
FIGURE_WIDTH_INCHES = NAMES_INCHES + ARRAYS_WIDTH_INCHES + COUNTS_INCHES
MAX_ARRAYS_HEIGHT_INCHES = 6.0
MIN_THICKNESS_INCHES = 0.3
MIN_GRID_CELL_INCHES = 0.06
GAP_INCHES = 0.35
TITLE_INCHES = 0.45
GATE_LABELS_INCHES = 0.6
PARAMETERS_INCHES = 0.8
NOTE_INCHES = 0.45


def save_layout(path, shapes, timesteps=None):
    """Draws `draw_layout(shapes, timesteps)` to the PNG file `path`."""
    draw_layout(shapes, timesteps).savefig(path, dpi=100)


def draw_layout(shapes, timesteps=None):
    """The weight layout of each LSTM in `shapes`, one panel each, top to bottom.

    Args:
        shapes: a non-empty list of `fusedlstm.explain.LstmShape`.
        timesteps: T, named in the note that the sequence length appears
            nowhere; `None` to leave it out.

    Returns:
        A `matplotlib.figure.Figure`: every word and number drawn on it is
        one of its `Text` artists.
    """
    from matplotlib.figure import Figure

    if not shapes:
        raise ValueError(f"Expected at least one LSTM shape to draw. Received: shapes={shapes!r}")
    panels = [_Panel(shape) for shape in shapes]
    height = sum(panel.height for panel in panels) + NOTE_INCHES
    figure = Figure(figsize=(FIGURE_WIDTH_INCHES, height))
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, FIGURE_WIDTH_INCHES)
    ax.set_ylim(height, 0)
    ax.axis("off")
    top = 0.0
    for panel in panels:
        panel.draw(ax, top)
        top += panel.height
    ax.text(FIGURE_WIDTH_INCHES / 2, height - NOTE_INCHES / 2, _sequence_length_note(timesteps),
            ha="center", va="center", fontsize=10.5, style="italic")
    return figure


def _arrays(shape):
    """`(name, rows, shape text, rows label)` of each weight array, top to bottom."""
    C, H = shape.input_dim, shape.units
    arrays = [
        ("kernel", C, f"(C, 4H) = {(C, 4 * H)}", f"one row per input feature (C = {C})"),
        ("recurrent_kernel", H, f"(H, 4H) = {(H, 4 * H)}",
         f"one row per unit of the last output h (H = {H})"),
    ]
    if shape.use_bias:
        arrays.append(("bias", 1, f"(4H,) = {(4 * H,)}", "one value per column"))
    return arrays


class _Panel:
    """One LSTM's three arrays, laid out in inches from the panel's top."""

    def __init__(self, shape):
        self.shape = shape
        self.columns = 4 * shape.units
        rows = sum(rows for _, rows, _, _ in _arrays(shape))
        self.cell = min(ARRAYS_WIDTH_INCHES / self.columns, MAX_ARRAYS_HEIGHT_INCHES / rows)
        self.thickness = [max(rows * self.cell, MIN_THICKNESS_INCHES)
                          for _, rows, _, _ in _arrays(shape)]
        self.height = (TITLE_INCHES + GATE_LABELS_INCHES
                       + sum(self.thickness) + GAP_INCHES * (len(self.thickness) - 1)
                       + PARAMETERS_INCHES)

    def draw(self, ax, top):
        ax.text(0.3, top + TITLE_INCHES / 2, self._title(), ha="left",
                va="center", fontsize=13, fontweight="bold")
        top += TITLE_INCHES
        self._label_gates(ax, top + GATE_LABELS_INCHES)
        y = top + GATE_LABELS_INCHES
        for (name, rows, shape_text, rows_label), thickness in zip(_arrays(self.shape),
                                                                   self.thickness):
            self._draw_array(ax, y, rows, thickness)
            middle = y + thickness / 2
            ax.text(NAMES_INCHES - 0.15, middle, f"{name}\n{shape_text}", ha="right",
                    va="center", fontsize=11.5, fontweight="bold")
            thicker = "\n(drawn thicker than to scale)" if thickness > rows * self.cell else ""
            ax.text(self._x(self.columns) + 0.15, middle,
                    f"{rows} * {self.columns} = {rows * self.columns}\n{rows_label}{thicker}",
                    ha="left", va="center", fontsize=10)
            y += thickness + GAP_INCHES
        self._write_parameters(ax, y - GAP_INCHES + PARAMETERS_INCHES / 2)

    def _title(self):
        shape = self.shape
        sizes = f"C = {shape.input_dim} input features, H = {shape.units} units"
        if shape.name:
            return f"{shape.name} ({shape.kind}): {sizes}"
        return f"LSTM with {sizes}"

    def _x(self, column):
        return NAMES_INCHES + column * self.cell

    def _draw_array(self, ax, top, rows, thickness):
        """The four gate blocks filled, with a grid of weights where cells are big enough."""
        from matplotlib.patches import Rectangle

        H = self.shape.units
        gridded = self.cell >= MIN_GRID_CELL_INCHES and thickness == rows * self.cell
        for g, ((letter, _), color) in enumerate(zip(GATES, GATE_COLORS)):
            ax.add_patch(Rectangle((self._x(g * H), top), H * self.cell, thickness,
                                   facecolor=color, edgecolor="none"))
            if gridded:
                for x in range(g * H + 1, (g + 1) * H):
                    ax.plot([self._x(x)] * 2, [top, top + thickness], color="white", lw=0.8)
                for row in range(1, rows):
                    y = top + row * self.cell
                    ax.plot([self._x(g * H), self._x((g + 1) * H)], [y, y], color="white",
                            lw=0.8)
            ax.text(self._x((g + 0.5) * H), top + thickness / 2, letter, ha="center",
                    va="center", fontsize=12, fontweight="bold", color="white",
                    bbox={"boxstyle": "round,pad=0.3", "facecolor": color, "edgecolor": "none"})
        for g in range(5):
            ax.plot([self._x(g * H)] * 2, [top, top + thickness], color="black", lw=1.2)
        for y in (top, top + thickness):
            ax.plot([self._x(0), self._x(self.columns)], [y, y], color="black", lw=1.2)

    def _label_gates(self, ax, bottom):
        """The gate names and column ranges above the top array."""
        H = self.shape.units
        for g, ((letter, name), color) in enumerate(zip(GATES, GATE_COLORS)):
            ax.text(self._x((g + 0.5) * H), bottom - 0.08,
                    f"{letter}: {name}\n[:, {g * H}:{(g + 1) * H}]", ha="center", va="bottom",
                    fontsize=10.5, color=color, fontweight="bold")
        ax.text(self._x(self.columns) + 0.15, bottom - 0.08,
                f"4 gates * H = 4 * {H}\n= {self.columns} columns", ha="left", va="bottom",
                fontsize=10)

    def _write_parameters(self, ax, middle):
        formula, values, product, total = param_arithmetic(
            self.shape.input_dim, self.shape.units, self.shape.use_bias)
        sizes = " + ".join(f"{rows * self.columns} ({name})"
                           for name, rows, _, _ in _arrays(self.shape))
        ax.text(self._x(0), middle,
                f"Parameters = {formula} = {values} = {product} = {total}\n"
                f"           = {sizes}",
                ha="left", va="center", fontsize=11.5, family="monospace")


def _sequence_length_note(timesteps):
    length = "The sequence length" if timesteps is None else f"The sequence length (T = {timesteps})"
    return (f"{length} appears nowhere: the same weights are applied at every timestep, "
            "so no shape above depends on it.")
