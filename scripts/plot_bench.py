"""Plot speed benchmark results and print them as a Markdown table.

Reads the JSON Lines records that `scripts/bench_hf.py` (Hugging Face PyTorch) and
`reformer-bench speed` (this repository) write, one record per implementation, attention
kind, mode and sequence length. It draws one PNG with two panels that share the x axis,
sequence length on a log2 scale:

- left: milliseconds per token on a log scale.
- right: peak resident memory on a log scale.

Each series is one implementation, attention kind and mode. Colour marks the
implementation and attention kind ("ours LSH", "ours full", "HF PyTorch"), and line style
marks the mode (solid for train, dashed for infer). A record without "attention" counts as
LSH, because `bench_hf.py` measures only LSH. Only records with status "ok" become points.
The others become markers at their length in a grey band along the top of both panels,
above the y axis ticks. The marker is an "x" for "does not fit", a triangle for "timeout"
and a diamond for an error. In the memory panel, a "does not fit" marker is labelled with
the record's memory estimate. Two panels, not one per mode, keep train and infer of one
implementation next to each other.

The script also prints to stdout one Markdown table with a row per sequence length and
batch size. It has tokens per second and peak MiB for each series, and the ratio of
"ours LSH" to Hugging Face tokens per second in train and in infer where both are "ok".
Warnings and errors go to stderr.

Run it by hand from the repository root after the benchmarks. CI never runs it, because it
needs matplotlib and benchmark results:

    /work/venv-hf/bin/python scripts/plot_bench.py \\
        bench-results/hf.jsonl bench-results/ours.jsonl \\
        --out bench-results/speed.png --title "Reformer speed, 32768 tokens per step" \\
        --subtitle "2-core AMD EPYC VM, 24 GiB RAM" > bench-results/speed.md
"""

import argparse
import json
import math
import os
import sys

PROGRAM = os.path.basename(sys.argv[0]) or "plot_bench.py"
MODES = ("train", "infer")
MODE_LINE_STYLES = {"train": "-", "infer": "--"}
REQUIRED_KEYS = ("implementation", "mode", "seq_len", "batch_size", "status")

# Short names of the implementations in legends and table headers.
IMPLEMENTATION_NAMES = {"reformer-rs": "ours", "hf-pytorch": "HF PyTorch"}
ATTENTION_NAMES = {"lsh": "LSH", "full": "full"}

# Colours of the known (implementation, attention) pairs, in plot and table order. They
# come from the Okabe-Ito palette, which stays distinct for colour-blind readers. Other
# pairs get the remaining palette colours in order of appearance.
KNOWN_COLOURS = {
    ("reformer-rs", "lsh"): "#0072B2",
    ("reformer-rs", "full"): "#E69F00",
    ("hf-pytorch", "lsh"): "#009E73",
    ("hf-pytorch", "full"): "#56B4E9",
}
SPARE_COLOURS = ("#D55E00", "#CC79A7", "#F0E442", "#000000")
OURS_LSH = ("reformer-rs", "lsh")
HF_LSH = ("hf-pytorch", "lsh")

# Marker of each status other than "ok", drawn in the grey band at the top of the panels.
STATUS_MARKERS = {"does not fit": "x", "timeout": "^", "error": "D"}
STATUS_LEGEND = {"does not fit": "does not fit", "timeout": "timed out", "error": "failed"}

# Position of the first marker row and the distance between rows in the grey band at the
# top of each panel, as fractions of the axes height.
MARKER_TOP = 0.95
MARKER_STEP = 0.075
LABEL_FONT_SIZE = 8.5


class PlotBenchError(Exception):
    """Invalid input, missing matplotlib or an unwritable PNG, reported as one line."""


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "results", nargs="+", metavar="RESULTS.jsonl", help="JSON Lines files of benchmark records"
    )
    parser.add_argument("--out", required=True, metavar="PNG", help="PNG file to write")
    parser.add_argument(
        "--title",
        default="Reformer speed and memory against sequence length",
        metavar="TEXT",
        help="heading above both panels",
    )
    parser.add_argument(
        "--subtitle",
        metavar="TEXT",
        help="second heading line, usually the machine (for example CPU, cores and RAM)",
    )
    return parser.parse_args(argv)


def status_kind(status):
    """Map a status string to a STATUS_MARKERS key ("error: ..." becomes "error")."""
    if status in STATUS_MARKERS:
        return status
    return "error"


def positive_number(value):
    """Return `value` as a float if it is a finite positive number, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def validate_record(record):
    """Return the reason `record` cannot be used, or None if it can."""
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not an object"
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        return f"has no {', '.join(missing)}"
    if not isinstance(record["implementation"], str) or not record["implementation"]:
        return f"has an invalid implementation {record['implementation']!r}"
    if record["mode"] not in MODES:
        return f"has mode {record['mode']!r}, expected one of {', '.join(MODES)}"
    for key in ("seq_len", "batch_size"):
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            return f"has {key} {value!r}, expected a positive integer"
    if not isinstance(record["status"], str):
        return f"has a non-string status {record['status']!r}"
    attention = record.get("attention", "lsh")
    if not isinstance(attention, str) or not attention:
        return f"has an invalid attention {attention!r}"
    return None


def derive_metrics(record):
    """Return (ms per token, tokens per second, peak MiB) of an "ok" record.

    Each value is None when the record lacks it. A missing ms per token or tokens per second
    is computed from the other one, or from `seconds_per_step` and the step's
    `batch_size * seq_len` tokens.
    """
    tokens = record["batch_size"] * record["seq_len"]
    seconds = positive_number(record.get("seconds_per_step"))
    ms_per_token = positive_number(record.get("ms_per_token"))
    tokens_per_second = positive_number(record.get("tokens_per_second"))
    if ms_per_token is None and seconds is not None:
        ms_per_token = 1000 * seconds / tokens
    if ms_per_token is None and tokens_per_second is not None:
        ms_per_token = 1000 / tokens_per_second
    if tokens_per_second is None and ms_per_token is not None:
        tokens_per_second = 1000 / ms_per_token
    # NOTE: GPU runs of `reformer-bench speed` also write peak_gpu_mib, which is not plotted
    # or tabulated. For them the memory panel shows host RSS only.
    peak_mib = positive_number(record.get("peak_rss_mib"))
    return ms_per_token, tokens_per_second, peak_mib


def read_results(path):
    """Read one JSON Lines file and return its usable records, each tagged with its origin.

    Raises PlotBenchError for a missing or unreadable file, a line that is not JSON, or a file
    without usable records. Other unusable records are skipped with a warning.
    """
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.readlines()
    except FileNotFoundError:
        raise PlotBenchError(f"results file not found: {path}") from None
    except IsADirectoryError:
        raise PlotBenchError(f"{path} is a directory; pass a JSON Lines results file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PlotBenchError(f"failed to read results file {path}: {error}") from None

    records = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.strip())
        except json.JSONDecodeError as error:
            raise PlotBenchError(
                f"{path} line {line_number} is not valid JSON ({error.msg} at column "
                f"{error.colno}); each line must be one JSON object"
            ) from None
        problem = validate_record(record)
        if problem is not None:
            warn(f"{path} line {line_number} {problem}; skipping it")
            continue
        if record["status"] == "ok":
            ms_per_token, _, _ = derive_metrics(record)
            if ms_per_token is None:
                warn(
                    f"{path} line {line_number} has status ok but no positive ms_per_token, "
                    "tokens_per_second or seconds_per_step; skipping it"
                )
                continue
        record = dict(record)
        record.setdefault("attention", "lsh")
        record["origin"] = f"{path} line {line_number}"
        records.append(record)

    if not records:
        raise PlotBenchError(
            f"{path} has no usable records; expected JSON Lines from scripts/bench_hf.py or "
            "`reformer-bench speed`"
        )
    return records


def warn(message):
    print(f"{PROGRAM}: warning: {message}", file=sys.stderr)


def merge_records(record_lists):
    """Return one record per (implementation, attention, mode, seq_len, batch_size).

    A later record replaces an earlier one for the same key, with a warning.
    """
    merged = {}
    for records in record_lists:
        for record in records:
            key = (
                record["implementation"],
                record["attention"],
                record["mode"],
                record["seq_len"],
                record["batch_size"],
            )
            if key in merged:
                earlier = merged[key]["origin"]
                warn(f"{record['origin']} replaces {earlier} (same series and length)")
            merged[key] = record
    return list(merged.values())


def series_groups(records):
    """Return the (implementation, attention) pairs in the records, known pairs first."""
    present = {(record["implementation"], record["attention"]) for record in records}
    known = [group for group in KNOWN_COLOURS if group in present]
    others = sorted(present - set(known))
    return known + others


def group_label(group):
    """Return the legend name of an (implementation, attention) pair, such as "ours LSH"."""
    implementation, attention = group
    name = IMPLEMENTATION_NAMES.get(implementation, implementation)
    # bench_hf.py measures only LSH, so its series is named after the implementation alone.
    if group == HF_LSH:
        return name
    return f"{name} {ATTENTION_NAMES.get(attention, attention)}"


def group_styles(groups):
    """Return {group: (label, colour)} for the given (implementation, attention) pairs."""
    styles = {}
    spare = iter(SPARE_COLOURS)
    for group in groups:
        colour = KNOWN_COLOURS.get(group) or next(spare, "#777777")
        styles[group] = (group_label(group), colour)
    return styles


def format_length(seq_len):
    """Format a token count as 512, 1K, 64K or 1M."""
    if seq_len >= 1024**2 and seq_len % 1024**2 == 0:
        return f"{seq_len // 1024**2}M"
    if seq_len >= 1024 and seq_len % 1024 == 0:
        return f"{seq_len // 1024}K"
    return str(seq_len)


def format_gib(gib):
    if gib >= 10:
        return f"{gib:.0f} GiB"
    return f"{gib:.1f} GiB"


def format_memory_tick(mib, _position=None):
    """Format a memory axis tick given in MiB as MiB below 1 GiB, else as GiB."""
    if mib < 1024:
        return f"{mib:g} MiB"
    return f"{mib / 1024:g} GiB"


def format_time_tick(ms, _position=None):
    return f"{ms:g}"


def format_rate(tokens_per_second):
    if tokens_per_second >= 100:
        return f"{tokens_per_second:,.0f}"
    return f"{tokens_per_second:.1f}"


def describe_setup(records):
    """Return a line naming the tokens per step, threads and software of the records."""
    parts = []
    step_tokens = {record["batch_size"] * record["seq_len"] for record in records}
    if len(step_tokens) == 1:
        parts.append(f"{step_tokens.pop():,} tokens per step")

    # One description per implementation, because its attention kinds share one build.
    setup_keys = (
        ("backend", "{} backend"),
        ("torch", "torch {}"),
        ("transformers", "transformers {}"),
        ("threads", "{} threads"),
    )
    implementations = dict.fromkeys(group[0] for group in series_groups(records))
    for implementation in implementations:
        own_records = [record for record in records if record["implementation"] == implementation]
        fields = []
        for key, template in setup_keys:
            values = sorted({str(record[key]) for record in own_records if key in record})
            if values:
                fields.append(template.format("/".join(values)))
        if fields:
            name = IMPLEMENTATION_NAMES.get(implementation, implementation)
            parts.append(f"{name}: {', '.join(fields)}")
    return "; ".join(parts)


def plot(records, out_path, title, subtitle):
    """Draw the time and memory panels and write them to `out_path` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    groups = series_groups(records)
    styles = group_styles(groups)
    lengths = sorted({record["seq_len"] for record in records})

    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(12, 5.6))
    panels = (
        (time_axes, 0, "ms per token (log scale)"),
        (memory_axes, 2, "peak RSS (log scale)"),
    )

    # Records other than "ok" become markers in a band at the top of each panel.
    group_order = {group: position for position, group in enumerate(groups)}
    failed = sorted(
        (record for record in records if record["status"] != "ok"),
        key=lambda record: (
            record["seq_len"],
            group_order[(record["implementation"], record["attention"])],
            MODES.index(record["mode"]),
        ),
    )
    slots = assign_marker_slots(failed, styles, lengths)
    marker_slots = max(slots, default=-1) + 1

    modes_present = [mode for mode in MODES if any(record["mode"] == mode for record in records)]
    series_handles = []
    for group in groups:
        label, colour = styles[group]
        for mode in modes_present:
            series = sorted(
                (
                    record
                    for record in records
                    if (record["implementation"], record["attention"]) == group
                    and record["mode"] == mode
                ),
                key=lambda record: record["seq_len"],
            )
            if not series:
                # A blank legend entry keeps one column per colour and one row per mode.
                series_handles.append(Line2D([], [], linestyle="none", label=" "))
                continue
            xs = [record["seq_len"] for record in series]
            # NaN breaks the line, so a length without a measurement leaves a gap.
            metrics = [
                derive_metrics(record) if record["status"] == "ok" else (None, None, None)
                for record in series
            ]
            for axes, index, _ in panels:
                ys = [math.nan if values[index] is None else values[index] for values in metrics]
                line = axes.plot(
                    xs,
                    ys,
                    color=colour,
                    linestyle=MODE_LINE_STYLES[mode],
                    marker="o",
                    markersize=4,
                    linewidth=1.8,
                    label=f"{label} {mode}",
                )[0]
            series_handles.append(line)

    for axes, index, ylabel in panels:
        values = [
            derive_metrics(record)[index] for record in records if record["status"] == "ok"
        ]
        values = [value for value in values if value is not None]
        data_top = set_log_limits(axes, values, marker_slots)
        low = axes.get_ylim()[0]
        if not values:
            # Without any "ok" record the y range is arbitrary, so it gets no tick labels.
            ticks = []
            formatter = format_time_tick
        elif index == 0:
            ticks = one_two_five_ticks(low, data_top)
            formatter = format_time_tick
        else:
            ticks = power_of_two_ticks(low, data_top)
            formatter = format_memory_tick
        # Ticks stop below the marker band, so no marker reads as a value on the y axis.
        axes.yaxis.set_major_locator(FixedLocator(ticks))
        axes.yaxis.set_major_formatter(FuncFormatter(formatter))
        axes.yaxis.set_minor_locator(NullLocator())
        if marker_slots:
            bottom = band_bottom(marker_slots)
            band = Rectangle(
                (0, bottom), 1, 1 - bottom, transform=axes.transAxes, color="#f2f2f2", zorder=0
            )
            axes.add_patch(band)

        axes.set_xscale("log", base=2)
        axes.xaxis.set_major_locator(FixedLocator(lengths))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_length(int(value))))
        axes.xaxis.set_minor_locator(NullLocator())
        low_exponent, high_exponent = length_axis_exponents(lengths)
        axes.set_xlim(2**low_exponent, 2**high_exponent)

        axes.set_xlabel("sequence length (tokens, log2 scale)")
        axes.set_ylabel(ylabel)
        axes.grid(True, which="major", color="#dddddd", linewidth=0.8)

    time_axes.set_title("time per token (lower is faster)", fontsize=11)
    memory_axes.set_title("peak memory (resident set size)", fontsize=11)

    statuses_seen = draw_status_markers(time_axes, memory_axes, failed, slots, styles, lengths)

    status_handles = [
        Line2D(
            [],
            [],
            color="#444444",
            marker=STATUS_MARKERS[kind],
            linestyle="none",
            markersize=7,
            label=f"{STATUS_LEGEND[kind]} (grey band)",
        )
        for kind in STATUS_MARKERS
        if kind in statuses_seen
    ]
    # Entries fill the legend column by column. Padding the status entries to whole columns
    # keeps each series column one colour, with train above infer.
    legend_rows = len(modes_present)
    status_columns = math.ceil(len(status_handles) / legend_rows)
    while len(status_handles) < status_columns * legend_rows:
        status_handles.append(Line2D([], [], linestyle="none", label=" "))
    figure.legend(
        handles=series_handles + status_handles,
        loc="lower center",
        ncol=len(groups) + status_columns,
        frameon=False,
        fontsize=9.5,
    )

    header_bottom = draw_header(figure, title, subtitle, describe_setup(records))
    legend_height = (0.26 * legend_rows + 0.1) / figure.get_figheight()
    figure.tight_layout(rect=(0, legend_height, 1, header_bottom))

    try:
        figure.savefig(out_path, dpi=120, format="png")
    except OSError as error:
        raise PlotBenchError(
            f"failed to write {out_path}: {error.strerror or error}; check that its folder "
            "exists and is writable"
        ) from None
    finally:
        plt.close(figure)


def draw_header(figure, title, subtitle, setup):
    """Write the title, subtitle and setup lines at the top and return their lowest y.

    The y is a figure fraction, for the top of `tight_layout`'s rectangle.
    """
    height = figure.get_figheight()
    lines = [(title, 13, "black")]
    if subtitle:
        lines.append((subtitle, 11, "black"))
    if setup:
        lines.append((setup, 9, "#555555"))
    y = 1 - 0.08 / height
    for text, size, colour in lines:
        figure.text(0.5, y, text, ha="center", va="top", fontsize=size, color=colour)
        # A line takes about 1.4 times its font size, and a point is 1/72 inch.
        y -= 1.4 * size / 72 / height
    return y - 0.05 / height


def set_log_limits(axes, values, marker_slots):
    """Set log y limits around `values`, with a free top band for `marker_slots` markers.

    Returns the y value at the bottom of that band, which is the axes top without markers.
    """
    axes.set_yscale("log")
    if values:
        low = math.log10(min(values))
        high = math.log10(max(values))
    else:
        low, high = 0.0, 1.0
    # At least half a decade, so that nearly equal values do not fill the whole height.
    span = max(high - low, 0.5)
    low -= (span - (high - low)) / 2

    # Data fills the axes height between the bottom margin and the band.
    bottom_fraction = 0.05
    band_fraction = band_bottom(marker_slots)
    top_fraction = band_fraction - 0.05
    total = span / (top_fraction - bottom_fraction)
    axis_low = low - bottom_fraction * total
    axes.set_ylim(10**axis_low, 10 ** (axis_low + total))
    return 10 ** (axis_low + total * band_fraction)


def band_bottom(marker_slots):
    """Return the bottom of the marker band as a fraction of the axes height."""
    if marker_slots == 0:
        return 1.0
    return MARKER_TOP - MARKER_STEP * (marker_slots - 0.5)


def one_two_five_ticks(low, high):
    """Return the values 1, 2 and 5 times a power of ten between `low` and `high`."""
    ticks = []
    for exponent in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        for factor in (1, 2, 5):
            value = factor * 10.0**exponent
            if low <= value <= high:
                ticks.append(value)
    return ticks


def power_of_two_ticks(low, high, max_ticks=8):
    """Return powers of two between `low` and `high`.

    Only every 2nd, 4th and so on power is kept when there are more than `max_ticks`.
    When fewer than three fit, 1.5 times each power is added, such as 768 MiB and 1.5 GiB.
    """
    exponents = range(math.floor(math.log2(low)), math.ceil(math.log2(high)) + 1)
    ticks = [2.0**exponent for exponent in exponents if low <= 2.0**exponent <= high]
    if len(ticks) < 3:
        ticks += [1.5 * 2.0**exponent for exponent in exponents]
        return sorted(tick for tick in ticks if low <= tick <= high)
    stride = 1
    while len(ticks[::stride]) > max_ticks:
        stride *= 2
    return ticks[::stride]


def length_axis_exponents(lengths):
    """Return the log2 x limits, with room beside the outer lengths for marker labels."""
    low_exponent = math.log2(lengths[0])
    high_exponent = math.log2(lengths[-1])
    margin = max(0.35, 0.08 * (high_exponent - low_exponent))
    return low_exponent - margin, high_exponent + margin


def status_label(record, label, panel):
    """Return the text beside a status marker in `panel`, which is "time" or "memory"."""
    kind = status_kind(record["status"])
    estimate = positive_number(record.get("estimate_gib"))
    if panel == "memory" and kind == "does not fit" and estimate is not None:
        return f"{label} {record['mode']}: est. {format_gib(estimate)}"
    return f"{label} {record['mode']}: {STATUS_LEGEND[kind]}"


def labels_go_left(seq_len, lengths):
    """Return whether a marker label goes left of the marker to stay inside the axes."""
    return seq_len == lengths[-1] and len(lengths) > 1


def assign_marker_slots(failed, styles, lengths):
    """Return the band row of each record in `failed`, 0 being the top row.

    Each record takes the first row where its label does not overlap another label. Label
    widths are estimated from their character count, for panels about 4.9 inches wide.
    """
    low_exponent, high_exponent = length_axis_exponents(lengths)
    octaves_per_inch = (high_exponent - low_exponent) / 4.9
    # About 0.55 em per character at 8.5 points, plus the marker and its 9-point offset.
    label_inches_per_character = 0.55 * LABEL_FONT_SIZE / 72
    marker_inches = 14 / 72

    # The (left, right) log2 extents of the labels placed so far, one list per row.
    extents_by_row = []
    slots = []
    for record in failed:
        label = styles[(record["implementation"], record["attention"])][0]
        characters = max(len(status_label(record, label, panel)) for panel in ("time", "memory"))
        width = (characters * label_inches_per_character + marker_inches) * octaves_per_inch
        marker_half = marker_inches / 2 * octaves_per_inch
        center = math.log2(record["seq_len"])
        if labels_go_left(record["seq_len"], lengths):
            extent = (center - width, center + marker_half)
        else:
            extent = (center - marker_half, center + width)

        row = 0
        while row < len(extents_by_row) and any(
            extent[0] < right and left < extent[1] for left, right in extents_by_row[row]
        ):
            row += 1
        if row == len(extents_by_row):
            extents_by_row.append([])
        extents_by_row[row].append(extent)
        slots.append(row)
    return slots


def draw_status_markers(time_axes, memory_axes, failed, slots, styles, lengths):
    """Mark records other than "ok" in the band at the top of both panels.

    `slots` gives each record's row in the band. In the memory panel, a "does not fit"
    marker is labelled with its memory estimate. Returns the status kinds drawn.
    """
    kinds_seen = set()
    for record, slot in zip(failed, slots):
        kind = status_kind(record["status"])
        kinds_seen.add(kind)
        label, colour = styles[(record["implementation"], record["attention"])]
        seq_len = record["seq_len"]
        label_left = labels_go_left(seq_len, lengths)
        y = MARKER_TOP - MARKER_STEP * slot
        for axes, panel in ((time_axes, "time"), (memory_axes, "memory")):
            axes.plot(
                seq_len,
                y,
                transform=axes.get_xaxis_transform(),
                marker=STATUS_MARKERS[kind],
                markersize=8 if kind == "does not fit" else 6,
                markeredgewidth=2,
                color=colour,
                linestyle="none",
                clip_on=False,
            )
            axes.annotate(
                status_label(record, label, panel),
                xy=(seq_len, y),
                xycoords=axes.get_xaxis_transform(),
                xytext=(-9 if label_left else 9, 0),
                textcoords="offset points",
                ha="right" if label_left else "left",
                va="center",
                fontsize=LABEL_FONT_SIZE,
                color=colour,
            )
    return kinds_seen


def build_table(records):
    """Return the lines of the Markdown table, with one row per (seq_len, batch_size)."""
    groups = series_groups(records)
    styles = group_styles(groups)
    by_key = {}
    for record in records:
        key = (record["implementation"], record["attention"], record["mode"])
        by_key[(key, record["seq_len"], record["batch_size"])] = record
    rows = sorted({(record["seq_len"], record["batch_size"]) for record in records})

    batches_per_length = {}
    for seq_len, batch_size in rows:
        batches_per_length.setdefault(seq_len, []).append(batch_size)
    for seq_len, batches in batches_per_length.items():
        if len(batches) > 1:
            warn(
                f"seq_len {seq_len} was measured with batch sizes "
                f"{', '.join(map(str, batches))}; the table gives each its own row"
            )

    # Each mode gets a tokens/s and a peak MiB column per series, then the LSH ratio column.
    columns = []
    for mode in MODES:
        for group in groups:
            if not any(series_key[0] == (*group, mode) for series_key in by_key):
                continue
            label = styles[group][0]
            columns.append((f"{label} {mode} tokens/s", "rate", (*group, mode)))
            columns.append((f"{label} {mode} peak MiB", "memory", (*group, mode)))
        has_ours = any(series_key[0] == (*OURS_LSH, mode) for series_key in by_key)
        has_hf = any(series_key[0] == (*HF_LSH, mode) for series_key in by_key)
        if has_ours and has_hf:
            columns.append((f"ours LSH / HF {mode} tokens/s", "ratio", mode))

    header = ["seq_len", "batch"] + [column[0] for column in columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" for _ in header) + "|",
    ]
    for seq_len, batch_size in rows:
        cells = [str(seq_len), str(batch_size)]
        for _, kind, series_key in columns:
            if kind == "ratio":
                ours = by_key.get(((*OURS_LSH, series_key), seq_len, batch_size))
                theirs = by_key.get(((*HF_LSH, series_key), seq_len, batch_size))
                cells.append(format_ratio(ours, theirs))
            else:
                record = by_key.get((series_key, seq_len, batch_size))
                cells.append(format_cell(record, kind))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_cell(record, kind):
    """Format one tokens/s or peak MiB cell; a record other than "ok" shows its status."""
    if record is None:
        return "-"
    if record["status"] != "ok":
        status = status_kind(record["status"])
        if kind == "rate":
            return STATUS_LEGEND[status]
        estimate = positive_number(record.get("estimate_gib"))
        if status == "does not fit" and estimate is not None:
            return f"est. {format_gib(estimate)}"
        return "-"
    _, tokens_per_second, peak_mib = derive_metrics(record)
    if kind == "rate":
        return "-" if tokens_per_second is None else format_rate(tokens_per_second)
    return "-" if peak_mib is None else f"{peak_mib:,.0f}"


def format_ratio(ours, theirs):
    if ours is None or theirs is None or ours["status"] != "ok" or theirs["status"] != "ok":
        return "-"
    ours_rate = derive_metrics(ours)[1]
    theirs_rate = derive_metrics(theirs)[1]
    return f"{ours_rate / theirs_rate:.2f}"


def main(argv):
    args = parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotBenchError(
            f"matplotlib is not installed for {sys.executable}; install it with "
            f"`{sys.executable} -m pip install matplotlib`"
        ) from None

    record_lists = [read_results(path) for path in args.results]
    records = merge_records(record_lists)
    for record in records:
        if record["status"] not in ("ok", "does not fit", "timeout"):
            warn(f"{record['origin']} has status {record['status']!r}")

    plot(records, args.out, args.title, args.subtitle)
    print("\n".join(build_table(records)))
    print(f"{PROGRAM}: wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except PlotBenchError as error:
        sys.exit(f"{PROGRAM}: error: {error}")
