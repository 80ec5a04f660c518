"""Per-case records -> report rows: per task and length, and overall; as a Rich table, a JSON document, a plot.

A row is one (task, length, mode, block, anchor):
    accuracy             mean score x 100 (RULER: string_match_all / string_match_part)
    retention            star rows: star accuracy / full accuracy x 100, over the samples both modes finished
    phase1_s             star and hybrid rows: mean Phase 1 seconds (null for full attention: it has no Phase 1)
    ttft_s               mean seconds from the start of the prompt's forward pass to the first answer token
    decode_tokens_per_s  mean decoding speed after the first token (over cases that decoded more than one token)
    peak_rss_mb          highest peak RSS seen in the row's runs (peak_cuda_mb likewise on CUDA)
    speedup              star rows: full ttft / (star phase1_s + star ttft), on the samples both modes finished
    delta                star rows: star accuracy - full accuracy in points, over the samples both modes finished
    delta_ci95           half-width of delta's 95 % confidence interval (normal approximation of the paired
                         per-sample differences; null under 2 samples): a loss whose interval holds 0 may be noise
    better, worse        star rows: how many paired samples Star scored higher / lower on than full attention
    answer_s             mean seconds per answer once the document is stored: prefill to last token (Phase 1 is
                         its own column); a hybrid row's includes the full-attention pass of the escalated cases
    escalated            hybrid rows: % of the cases answered again with full attention (starqa.answer.hybrid)
    escalated_to         hybrid rows: what answered them again, "full" or a model (eval --escalate-to MODEL; the
                         row is labelled hybrid→MODEL and its delta still compares it with this model's full attention)
Hybrid rows (mode "hybrid", one per Star configuration) are composed from the same cases' Star and full records
(starqa.answer.hybrid.compose_record); their delta, better and worse compare them with full attention like a Star row's.
    source_hit           % of the cases with a reference answer written once in the context whose first source
                         block (starqa.evidence) holds it; evidence_hit likewise for the first evidence quote
Overall rows (task "overall") average each mode's per-task rows at one length, over the tasks that mode ran; their
delta_ci95 combines the per-task variances (a stratified mean), and better / worse add up the tasks' counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean, stdev

from starqa import report
from starqa.errors import StarqaError, UsageError


def _mean(values) -> float | None:
    values = [value for value in values if value is not None]
    return fmean(values) if values else None


def _max(values) -> float | None:
    values = [value for value in values if value is not None]
    return max(values) if values else None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _mode_key(record: dict) -> tuple:
    return (record["mode"], record["block_size"], record["anchor_size"])


def _mode_order(key: tuple) -> tuple:
    mode, block, anchor = key
    return (mode != "full", block or 0, anchor or 0, mode == "hybrid")


def _answer_s(record: dict) -> float:
    from starqa.answer.hybrid import answer_seconds

    return answer_seconds(record)


def _star_latency(record: dict) -> float:
    return (record["phase1_s"] or 0.0) + record["ttft_s"]


Z95 = 1.959964  # two-sided 95 % quantile of the normal distribution


def _paired(star_scores: Sequence[float], full_scores: Sequence[float]) -> dict:
    """Star minus full on the same samples: mean difference in points, its variance of the mean, wins, losses."""
    differences = [star - full for star, full in zip(star_scores, full_scores)]
    variance = stdev(differences) ** 2 / len(differences) if len(differences) > 1 else None
    return {"delta": 100 * fmean(differences), "variance": None if variance is None else 100 ** 2 * variance,
            "better": sum(d > 0 for d in differences), "worse": sum(d < 0 for d in differences)}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def summarize(records: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(rows per task and length, overall rows per length), both ordered by length, then full before star."""
    groups: dict[tuple, dict[int, dict]] = {}
    for record in records:
        groups.setdefault((record["task"], record["length"], *_mode_key(record)), {})[record["index"]] = record
    task_order: dict[str, int] = {}
    for record in records:
        task_order.setdefault(record["task"], len(task_order))

    rows = []
    for key in sorted(groups, key=lambda k: (k[1], task_order[k[0]], _mode_order(k[2:]))):
        task, length, mode, block, anchor = key
        cases = groups[key]
        full = groups.get((task, length, "full", None, None), {})
        row = {
            "task": task, "length": length, "mode": mode, "block_size": block, "anchor_size": anchor,
            "samples": len(cases),
            "accuracy": 100 * fmean(case["score"] for case in cases.values()),
            "retention": None,
            "phase1_s": _mean(case["phase1_s"] for case in cases.values()) if mode != "full" else None,
            "ttft_s": fmean(case["ttft_s"] for case in cases.values()),
            "decode_tokens_per_s": _mean(case["decode_tokens_per_s"] for case in cases.values()
                                         if case["new_tokens"] > 1),
            "peak_rss_mb": _max(case["peak_rss_mb"] for case in cases.values()),
            "peak_cuda_mb": _max(case.get("peak_cuda_mb") for case in cases.values()),
            "speedup": None,
            "answer_s": fmean(_answer_s(case) for case in cases.values()),
            "answer_ratio": None,  # star and hybrid rows: answer_s / full attention's, on the paired samples
            "escalated": (100 * fmean(bool(case.get("escalated")) for case in cases.values())
                          if mode == "hybrid" else None),
            # hybrid rows: what answered again, "full" (full attention) or a model (--escalate-to)
            "escalated_to": (next(iter(cases.values())).get("escalated_to", "full") if mode == "hybrid" else None),
            # % of cases whose first source block / first evidence quote holds the answer (None where not applicable)
            "source_hit": _mean(100.0 * case["source_hit"] for case in cases.values()
                                if case.get("source_hit") is not None),
            "evidence_hit": _mean(100.0 * case["evidence_hit"] for case in cases.values()
                                  if case.get("evidence_hit") is not None),
            **_NO_PAIRS,
        }
        if mode != "full":
            paired = sorted(set(cases) & set(full))
            if paired:
                full_accuracy = fmean(full[i]["score"] for i in paired)
                star_accuracy = fmean(cases[i]["score"] for i in paired)
                row["retention"] = _ratio(100 * star_accuracy, full_accuracy)
                row["speedup"] = _ratio(fmean(full[i]["ttft_s"] for i in paired),
                                        fmean(_star_latency(cases[i]) for i in paired))
                row.update(_paired([cases[i]["score"] for i in paired], [full[i]["score"] for i in paired]))
                row["answer_ratio"] = _ratio(fmean(_answer_s(cases[i]) for i in paired),
                                             fmean(_answer_s(full[i]) for i in paired))
        rows.append(row)
    overall = _overall(rows)
    return [_finished(row) for row in rows], [_finished(row) for row in overall]


_NO_PAIRS = {"delta": None, "variance": None, "better": None, "worse": None}


def _finished(row: dict) -> dict:
    """The row as reported: the variance of delta becomes a 95 % half-width, numbers are rounded."""
    row = dict(row)
    variance = row.pop("variance")
    row["delta_ci95"] = None if variance is None else Z95 * math.sqrt(variance)
    return _rounded(row)


def _overall(rows: Sequence[dict]) -> list[dict]:
    by_length_mode: dict[tuple, list[dict]] = {}
    for row in rows:
        by_length_mode.setdefault((row["length"], row["mode"], row["block_size"], row["anchor_size"]), []).append(row)
    overall = []
    for key in sorted(by_length_mode, key=lambda k: (k[0], _mode_order(k[1:]))):
        length, mode, block, anchor = key
        group = by_length_mode[key]
        row = {
            "task": "overall", "length": length, "mode": mode, "block_size": block, "anchor_size": anchor,
            "samples": sum(row["samples"] for row in group),
            "accuracy": fmean(row["accuracy"] for row in group),
            "retention": None,
            "phase1_s": _mean(row["phase1_s"] for row in group),
            "ttft_s": fmean(row["ttft_s"] for row in group),
            "decode_tokens_per_s": _mean(row["decode_tokens_per_s"] for row in group),
            "peak_rss_mb": _max(row["peak_rss_mb"] for row in group),
            "peak_cuda_mb": _max(row["peak_cuda_mb"] for row in group),
            "speedup": None,
            "answer_s": fmean(row["answer_s"] for row in group),
            "answer_ratio": None,
            "escalated": _mean(row["escalated"] for row in group),
            "escalated_to": group[0].get("escalated_to"),
            "source_hit": _mean(row.get("source_hit") for row in group),
            "evidence_hit": _mean(row.get("evidence_hit") for row in group),
            **_NO_PAIRS,
        }
        if mode != "full":
            full = {r["task"]: r for r in by_length_mode.get((length, "full", None, None), [])}
            paired = [r for r in group if r["task"] in full]
            if paired:
                row["retention"] = _ratio(100 * fmean(r["accuracy"] for r in paired),
                                          fmean(full[r["task"]]["accuracy"] for r in paired))
                row["answer_ratio"] = _ratio(fmean(r["answer_s"] for r in paired),
                                             fmean(full[r["task"]]["answer_s"] for r in paired))
                row["speedup"] = _ratio(fmean(full[r["task"]]["ttft_s"] for r in paired),
                                        fmean((r["phase1_s"] or 0.0) + r["ttft_s"] for r in paired))
            measured = [r for r in group if r["delta"] is not None]
            if measured:
                # The overall accuracy is a mean of task means, so its delta's variance is sum(var_t) / tasks^2.
                variances = [r["variance"] for r in measured]
                row["delta"] = fmean(r["delta"] for r in measured)
                row["variance"] = (None if None in variances else sum(variances) / len(measured) ** 2)
                row["better"] = sum(r["better"] for r in measured)
                row["worse"] = sum(r["worse"] for r in measured)
        overall.append(row)
    return overall


def _rounded(row: dict) -> dict:
    digits = {"accuracy": 2, "retention": 2, "phase1_s": 4, "ttft_s": 4, "decode_tokens_per_s": 2,
              "peak_rss_mb": 1, "peak_cuda_mb": 1, "speedup": 3, "source_hit": 1, "evidence_hit": 1, "delta": 2,
              "delta_ci95": 2, "answer_s": 4, "escalated": 1, "answer_ratio": 3}
    return {key: _round(value, digits[key]) if key in digits else value for key, value in row.items()}


def only_modes(rows: list[dict], modes) -> list[dict]:
    """The rows of the modes asked for (star, full, hybrid)."""
    return [row for row in rows if row["mode"] in modes]


def mode_label(row: dict) -> str:
    if row["mode"] == "full":
        return "full"
    target = row.get("escalated_to")
    mode = f"hybrid→{target}" if row["mode"] == "hybrid" and target not in (None, "full") else row["mode"]
    return f"{mode} {row['block_size']}/{row['anchor_size']}"


# ---------------------------------------------------------------- output


def document(model: str, rows: list[dict], overall: list[dict], **extra) -> dict:
    """The --json document: one object, {"model", "results", "overall", ...}."""
    return {"model": model, **extra, "results": rows, "overall": overall}


def _cell(value, fmt: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{fmt}}{suffix}"


def _delta_cell(row: dict) -> str:
    if row["delta"] is None:
        return "–"
    spread = "" if row["delta_ci95"] is None else f" ±{row['delta_ci95']:.1f}"
    return f"{row['delta']:+.1f}{spread}"


def print_table(rows: list[dict], overall: list[dict], *, title: str) -> None:
    if report.is_quiet():
        return
    from rich.table import Table

    cuda = any(row["peak_cuda_mb"] is not None for row in rows)
    table = Table()
    for header, justify in (("task", "left"), ("length", "right"), ("mode", "left"), ("n", "right"),
                            ("accuracy %", "right"), ("retention %", "right"), ("Phase 1 s", "right"),
                            ("TTFT s", "right"), ("decode tok/s", "right"), ("peak RSS MiB", "right")):
        table.add_column(header, justify=justify, no_wrap=header in ("task", "mode"))
    if cuda:
        table.add_column("peak CUDA MiB", justify="right")
    table.add_column("s/answer", justify="right")
    hybrid = any(row["mode"] == "hybrid" for row in rows)
    if hybrid:
        table.add_column("escalated %", justify="right")
    table.add_column("speed-up", justify="right")
    table.add_column("Δ acc ±95 %", justify="right")
    table.add_column("won/lost", justify="right")
    table.add_column("source hit %", justify="right")
    table.add_column("quote hit %", justify="right")

    def add(row: dict, style: str | None = None) -> None:
        cells = [row["task"], f"{row['length']:,}", mode_label(row), str(row["samples"]),
                 _cell(row["accuracy"], ".1f"), _cell(row["retention"], ".1f"), _cell(row["phase1_s"], ".3f"),
                 _cell(row["ttft_s"], ".3f"), _cell(row["decode_tokens_per_s"], ".1f"),
                 _cell(row["peak_rss_mb"], ",.0f")]
        if cuda:
            cells.append(_cell(row["peak_cuda_mb"], ",.0f"))
        cells.append(_cell(row.get("answer_s"), ".2f") + ("" if row.get("answer_ratio") is None
                                                          else f" ({row['answer_ratio']:.2f}×)"))
        if hybrid:
            cells.append(_cell(row.get("escalated"), ".0f"))
        cells.append(_cell(row["speedup"], ".2f", "×"))
        cells.append(_delta_cell(row))
        cells.append("–" if row["better"] is None else f"{row['better']}/{row['worse']}")
        cells.append(_cell(row.get("source_hit"), ".0f"))
        cells.append(_cell(row.get("evidence_hit"), ".0f"))
        table.add_row(*cells, style=style)

    for position, row in enumerate(rows):
        if position and row["length"] != rows[position - 1]["length"]:
            table.add_section()
        add(row)
    several = {length for length in {row["length"] for row in rows}
               if len({row["task"] for row in rows if row["length"] == length}) > 1}
    shown = [row for row in overall if row["length"] in several]  # an overall of one task would repeat its rows
    if shown:
        table.add_section()
        for row in shown:
            add(row, style="bold")
    report.print_table(table, title)  # off a terminal at a fixed wide width: Rich's 80 columns would wrap every row


def plot(overall: list[dict], path: Path | str, *, title: str, series: Sequence[tuple[str, object]] | None = None) -> None:
    """Accuracy and speed-up against context length, one line per mode.

    `series` is [(label, spec)] where spec resolves a length to a concrete mode (runner.StarSpec, or None for full
    attention); without it, each concrete (block, anchor) pair is its own line.
    """
    plt = require_matplotlib()
    lengths = sorted({row["length"] for row in overall})
    by_key = {(row["length"], row["mode"], row["block_size"], row["anchor_size"]): row for row in overall}
    lines: dict[str, list[dict]] = {}
    if series is None:
        for row in overall:
            lines.setdefault(mode_label(row), []).append(row)
    else:
        for label, spec in series:
            for length in lengths:
                key = ((length, "full", None, None) if spec is None
                       else (length, "star", spec.block.resolve(length), spec.anchor.resolve(length)))
                if key in by_key:
                    lines.setdefault(label, []).append(by_key[key])

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)
    star_markers = iter(["s", "^", "D", "v", "P", "X", "<", ">"] * 4)
    for label, points in lines.items():
        points = sorted(points, key=lambda row: row["length"])
        xs = [row["length"] for row in points]
        if label == "full":
            style = dict(marker="o", markersize=8, linewidth=2, color="black", linestyle="--")
        else:  # hollow markers of different shapes stay visible where lines meet
            style = dict(marker=next(star_markers), markersize=9, markerfacecolor="none", markeredgewidth=1.8,
                         linewidth=1.6)
        left.plot(xs, [row["accuracy"] for row in points], label=label, **style)
        if label == "full":
            right.plot(xs, [1.0] * len(xs), label=label, **style)
        else:
            speedups = [row["speedup"] if row["speedup"] is not None else math.nan for row in points]
            right.plot(xs, speedups, label=label, **style)
    for axis, ylabel in ((left, "accuracy (%)"), (right, "speed-up over full attention (×)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths, [f"{length:,}" for length in lengths])
        axis.minorticks_off()
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
    left.set_ylim(-3, 103)
    left.set_title("accuracy (mean over tasks)")
    right.set_title("speed-up in time to first answer token (Phase 1 included)")
    right.set_ylim(bottom=0)
    handles, labels = left.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), frameon=False)
    figure.suptitle(title)
    figure.savefig(path, dpi=130)
    plt.close(figure)


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise StarqaError("--plot needs matplotlib, which is not installed: pip install matplotlib "
                          "(make install installs it)") from None
    return plt


def check_plot_path(path: Path) -> None:
    """Refuse a --plot path matplotlib cannot write before the run, not after hours of measuring."""
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    if not path.parent.is_dir():
        raise UsageError(f"cannot write the plot {path}: folder {path.parent} does not exist")
    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix.lower().removeprefix(".")
    if suffix and suffix not in formats:
        raise UsageError(f"--plot cannot write .{suffix} files; use .png, .svg or .pdf")
