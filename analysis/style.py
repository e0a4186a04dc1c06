"""How the figures look: the matplotlib style, each series' colour and label, axis helpers, and saving a figure
as PNG and PDF (atomically)."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from embscale.base.files import atomic_file  # noqa: E402

FORMATS = ("png", "pdf")
PNG_DPI = 130
# zlib level of the PNG files: the same pixels as the default (6) in half the encoding time, files ~10% larger
PNG_COMPRESS_LEVEL = 1
STYLE = {
    "font.size": 8.5,
    "axes.titlesize": 9.5,
    "axes.labelsize": 8.5,
    "figure.titlesize": 10.5,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 7.5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.4,
    "lines.markersize": 4,
    "pdf.fonttype": 3,  # Type 42 subsetting through fontTools cost a third of the plotting time
}
FAMILY_COLORS = {"moe": "#1f77b4", "ne": "#d62728", "ple": "#2ca02c", "plne": "#9467bd", "dense": "#7f7f7f"}
FAMILY_NAMES = {"moe": "MoE", "ne": "NE", "ple": "PLE", "plne": "PLNE", "dense": "Dense"}
# NE anchored at different base ratios: lighter for lower anchors
ANCHOR_SHADES = ["#f4a582", "#d6604d", "#b2182b", "#67001f"]
NICE_RATIOS = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)

Log = Callable[[str], None]


def is_nan(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def human(n: float, digits: int = 3) -> str:
    """6.4e9 -> '6.4B', 2.8e8 -> '280M' (``digits`` significant digits)."""
    if is_nan(n) or not np.isfinite(n):
        return "?"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}g}{unit}"
    return f"{n:.{digits}g}"


def _sci(n: float, digits: int = 2) -> str:
    """Compact tick label: 3e19, 1.5e20 (``digits`` significant digits); parameter counts go through
    :func:`human`."""
    if n <= 0:
        return ""
    exponent = int(math.floor(math.log10(n)))
    mantissa = n / 10**exponent
    return f"{mantissa:.{digits}g}e{exponent}" if abs(mantissa - 1) > 1e-9 else f"1e{exponent}"


class _CountLocator(ticker.Locator):
    """Ticks of a log axis of counts: 1, 2 and 5 per decade, or 1 and 3, or decades only, the densest whose labels
    have room on the axis (about 0.42 inch a label); over a range narrower than a factor of 3 (a panel of runs of
    nearly one size), three or so evenly spaced ticks instead."""

    LABEL_INCHES = 0.42  # a label such as "200M" at the tick font size, with the gap to its neighbour
    SUBS = ((1.0, 2.0, 5.0), (1.0, 3.0), (1.0,))

    def __init__(self) -> None:
        self.logs = [ticker.LogLocator(base=10, subs=subs, numticks=12) for subs in self.SUBS]
        self.linear = ticker.MaxNLocator(nbins=3, min_n_ticks=2)

    def set_axis(self, axis) -> None:
        super().set_axis(axis)
        for locator in self.logs:
            locator.set_axis(axis)
        self.linear.set_axis(axis)

    def __call__(self):
        return self.tick_values(*self.axis.get_view_interval())

    def _room(self) -> int:
        """Labels that fit along the axis (7 when it is not drawn yet)."""
        axis = getattr(self, "axis", None)
        if axis is None or axis.axes is None:
            return 7
        box = axis.axes.get_window_extent()
        length = (box.width if axis.axis_name == "x" else box.height) / axis.axes.figure.dpi
        return max(2, int(length / self.LABEL_INCHES))

    def tick_values(self, vmin: float, vmax: float):
        lo, hi = sorted((vmin, vmax))
        if lo > 0 and hi / lo < 3:
            return [t for t in self.linear.tick_values(lo, hi) if lo <= t <= hi]
        room = self._room()
        for locator in self.logs:
            ticks = locator.tick_values(vmin, vmax)
            if sum(lo <= t <= hi for t in ticks) <= room:
                return ticks
        ticks = self.logs[-1].tick_values(vmin, vmax)  # decades, every other one (or fewer) until they fit
        step = -(-sum(lo <= t <= hi for t in ticks) // room)
        return ticks[::step]


class _CountFormatter(ticker.Formatter):
    """Labels of counts (280M, 6.4B) or FLOPs (3e19) with as many significant digits as it takes for neighbouring
    ticks to read differently (1.305M, 1.31M, 1.315M rather than 1.31M three times)."""

    def __init__(self, kind: str):
        self.kind = kind

    def _label(self, value: float, digits: int) -> str:
        return human(value, digits) if self.kind == "params" else _sci(value, digits - 1)

    def __call__(self, value: float, pos: int | None = None) -> str:
        return self._label(value, 3)

    def format_ticks(self, values) -> list[str]:
        labels = [self._label(v, 3) for v in values]
        for digits in range(4, 8):
            if len(set(labels)) == len(labels):
                break
            labels = [self._label(v, digits) for v in values]
        return labels


def split_title(split: str) -> str:
    """``train`` -> "training loss", ``val`` (a single held-out split) -> "validation loss", ``val_code`` ->
    "validation loss (code)"."""
    if split == "train":
        return "training loss"
    return "validation loss" if split == "val" else f"validation loss ({split[len('val_'):]})"


def series_label(family: str, base_ratio: object = None, note: str | None = None) -> str:
    """``NE (base ratio 12)``; a ``note`` joins the parenthesis (``NE (base ratio 12; no fit)``)."""
    name = FAMILY_NAMES.get(family, str(family))
    details = [f"base ratio {float(base_ratio):g}"] if family != "moe" and not is_nan(base_ratio) else []
    details += [note] if note else []
    return f"{name} ({'; '.join(details)})" if details else name


def series_color(family: str, base_ratio: object, anchors: Sequence[float]) -> str:
    if family == "ne" and not is_nan(base_ratio) and len(anchors) > 1 and float(base_ratio) in anchors:
        index = sorted(anchors).index(float(base_ratio))
        span = np.linspace(0, len(ANCHOR_SHADES) - 1, len(anchors)).round().astype(int)
        return ANCHOR_SHADES[span[index]]
    return FAMILY_COLORS.get(family, "#333333")


def size_label(width: object, depth: object, activated: float | None = None) -> str:
    parts = []
    if not is_nan(width):
        parts.append(f"width {float(width):g}")
    if not is_nan(depth):
        parts.append(f"depth {float(depth):g}")
    if activated is not None and np.isfinite(activated):
        parts.append(f"{human(activated)} activated")
    return ", ".join(parts)


def slug(*values: object) -> str:
    out = []
    for prefix, value in zip(("w", "d"), values, strict=False):
        if not is_nan(value):
            out.append(f"{prefix}{float(value):g}")
    return "_".join(out) or "all"


def subplots(nrows: int, ncols: int, panel: tuple[float, float] = (3.2, 2.5), *, left: float = 0.7,
             right: float = 0.2, bottom: float = 0.55, top: float = 0.65, wgap: float = 0.7, hgap: float = 0.75,
             **kwargs: object) -> tuple[plt.Figure, np.ndarray]:
    """A grid of panels of ``panel`` inches with fixed margins (inches); ``axes`` is always 2-D."""
    width = left + right + ncols * panel[0] + (ncols - 1) * wgap
    height = bottom + top + nrows * panel[1] + (nrows - 1) * hgap
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, **kwargs)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=wgap / panel[0], hspace=hgap / panel[1])
    return fig, axes


def make_room_right(fig: plt.Figure, artist: matplotlib.artist.Artist, pad: float = 0.1) -> None:
    """Widen the figure on the right until ``artist`` (a legend beside the panels) fits with ``pad`` inches to
    spare, every panel keeping its size and place in inches; nothing changes when it already fits."""
    renderer = fig.canvas.get_renderer()
    overflow = (artist.get_window_extent(renderer).x1 - fig.bbox.x1) / fig.dpi + pad
    if overflow <= 1e-3:  # fits (a figure widened once measures about 0 here)
        return
    old = fig.get_figwidth()
    boxes = [(ax, ax.get_position()) for ax in fig.axes]
    fig.set_figwidth(old + overflow)
    scale = old / (old + overflow)
    for ax, box in boxes:
        ax.set_position([box.x0 * scale, box.y0, box.width * scale, box.height])


def set_title(fig: plt.Figure, text: str) -> None:
    """The figure's title, its font shrunk (down to 8 pt) so that it fits 94% of the figure's width as rendered;
    a title still too wide at 8 pt is broken into two lines at the separator nearest its middle, at 9 pt at most,
    and the panels move down by the second line's height."""
    size = plt.rcParams["figure.titlesize"]
    size = size if isinstance(size, (int, float)) else 10.5
    title = fig.suptitle(text, y=1 - 0.12 / fig.get_figheight(), va="top", fontsize=size)
    renderer = fig.canvas.get_renderer()
    available = 0.94 * fig.get_figwidth() * fig.dpi
    width = title.get_window_extent(renderer).width  # linear in the font size
    fontsize = max(8.0, min(size, size * available / width)) if width > 0 else size
    if width * fontsize / size > available:
        text = _two_lines(text)
        title.set_text(text)
        width = title.get_window_extent(renderer).width
        fontsize = max(6.0, min(9.0, size, size * available / width))
        # the second line takes room from the panels, not from their titles
        fig.subplots_adjust(top=fig.subplotpars.top - 1.25 * fontsize / 72 / fig.get_figheight())
    title.set_fontsize(fontsize)


def _two_lines(text: str) -> str:
    """``text`` broken after the separator ("; ", ", ", ": ", " (", " ") nearest its middle."""
    middle = len(text) / 2
    for separator, after in (("; ", 2), (", ", 2), (": ", 2), (" (", 1), (" ", 1)):  # cut after the mark
        cuts = [i + after for i in range(len(text)) if text.startswith(separator, i)]
        if cuts:
            cut = min(cuts, key=lambda i: abs(i - middle))
            return text[:cut].rstrip() + "\n" + text[cut:].lstrip()
    return text


def ratio_axis(ax: plt.Axes, lo: float, hi: float, log: bool) -> None:
    """Ratio x axis: log scale with plain ticks at 4, 8, 16, ... when ``log``."""
    if not log:
        return
    ax.set_xscale("log")
    ticks = [t for t in NICE_RATIOS if lo / 1.05 <= t <= hi * 1.05]
    if len(ticks) > 7:
        ticks = ticks[::2]
    if len(ticks) >= 2:
        ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _p: f"{v:g}"))
        ax.xaxis.set_minor_locator(ticker.NullLocator())


def count_axis(ax: plt.Axes, which: str = "x", kind: str = "params") -> None:
    """Log axis of parameter counts (280M, 6.4B) or FLOPs (3e19)."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(_CountLocator())
    axis.set_major_formatter(_CountFormatter(kind))
    axis.set_minor_locator(ticker.NullLocator())


def legend(ax: plt.Axes, **kwargs) -> None:
    """The axes' legend with one entry per label: series that share a label (variants of one family drawn
    separately) are listed once."""
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        ax.legend(list(unique.values()), list(unique), **kwargs)


_CAVEATS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("figure_caveats", default=())


@contextlib.contextmanager
def figure_caveats(lines: Sequence[str]) -> Iterator[None]:
    """Every figure saved inside the block carries ``lines`` as a footnote (what a reader must know about the
    runs behind it, such as repeated training data)."""
    token = _CAVEATS.set(tuple(lines))
    try:
        yield
    finally:
        _CAVEATS.reset(token)


def _keep_unmoved_titles(fig: plt.Figure) -> None:
    """After a figure's first draw, stop matplotlib placing again the axes titles that it left in place.

    Each draw places every axes title anew (``Axes._update_title_position``): it measures the y axis's tick labels
    to find its offset text ("1e-3", "+3.5"), a tenth of a figure's drawing time, and moves the title up only when
    that text overlaps it or the x axis has ticks or its label on top. Where neither can happen (no top ticks or
    label, no offset text shown: the drawing just done has set both) the next draw (the PDF, after the PNG) would
    leave the title at the same place, so it is told to: the files are the same, drawn in less time. A title
    that was moved keeps being placed by matplotlib. (Private attributes of matplotlib's: a version without them
    places every title at every drawing, as before.)"""
    try:
        _keep_titles(fig)
    except AttributeError:
        pass


def _keep_titles(fig: plt.Figure) -> None:
    for ax in fig.axes:
        titles = (ax.title, ax._left_title, ax._right_title)
        if ax._autotitlepos is False or not any(title.get_text() for title in titles):
            continue
        if ax._twinned_axes.get_siblings(ax) != [ax] or ax.child_axes \
                or fig._align_label_groups["title"].get_siblings(ax) != [ax]:
            continue
        if ax.xaxis.get_ticks_position() in ("top", "unknown") or ax.xaxis.get_label_position() == "top":
            continue
        offset = ax.yaxis.offsetText
        if offset.get_visible() and offset.get_text():
            continue
        if all(title.get_position()[1] == 1.0 for title in titles):
            ax._autotitlepos = False


def save_figure(fig: plt.Figure, out_dir: Path, name: str, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Save ``fig`` as ``out_dir/name.<fmt>`` for each format, each atomically (temp file, rename); close it.
    Inside :func:`figure_caveats` the figure gets their footnote below its axes."""
    paths = []
    caveats = _CAVEATS.get()
    extra: dict = {}
    if caveats:
        fig.text(0.01, -0.01, "\n".join(f"Note: {line}" for line in caveats), ha="left", va="top",
                 fontsize=7, color="0.3", wrap=True)
        extra = {"bbox_inches": "tight", "pad_inches": 0.08}
    try:
        for fmt in formats:
            path = out_dir / f"{name}.{fmt}"
            with atomic_file(path) as tmp:
                if fmt == "png":
                    fig.savefig(tmp, format=fmt, dpi=PNG_DPI, pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL},
                                **extra)
                else:
                    fig.savefig(tmp, format=fmt, **extra)
            paths.append(path)
            _keep_unmoved_titles(fig)
    finally:
        plt.close(fig)
    return paths
