"""What the ``kface`` commands show: one console for messages (stderr) and one for
results (stdout), one-line notes and errors, and the tables of each command's answer.
Markup is off everywhere: paths, values and install hints ("kface-pipeline[onnx]",
"models[old]/m") print as they are; styles go through ``say``'s Text."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console

# soft_wrap: never break a line
console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


def stdout_console() -> Console:
    """The console for results on stdout (tables): a pipe or file gets whole lines."""
    return Console(soft_wrap=True, markup=False, highlight=False,
                   width=None if sys.stdout.isatty() else 200)


def say(label: str, style: str, message: str) -> None:
    """``label message`` on stderr, the label styled, the message verbatim."""
    from rich.text import Text

    console.print(Text.assemble((label, style), " ", message))


def fail(message: str, code: int = 2) -> None:
    """One error line, and exit ``code``."""
    say("error:", "bold red", message)
    raise typer.Exit(code)


def debug() -> bool:
    """``kface --debug``: errors keep their tracebacks."""
    return os.environ.get("KFACE_DEBUG") == "1"


def quiet_user_errors(types: tuple[type[BaseException], ...]) -> None:
    """Prefect's log records of errors the CLI reports in one line are dropped (unless
    --debug)."""
    from flows.logs import quiet_user_errors as install

    if not debug():
        install(types)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def api_line(url: str, temporary: bool) -> str:
    if not temporary:
        return f"Prefect API: {url}"
    return (f"Prefect API: {url} (a temporary server for this run; the run folder keeps "
            "everything, and 'kface server' gives a lasting UI)")


def print_run(summaries: dict[str, dict], out: Path) -> None:
    """Each stage's rows and time (or cached), the run folder, and any report."""
    for name, s in summaries.items():
        how = "cached" if s.get("reused") else f"{s['seconds']}s"
        say(f"{name}:", "green", f"{s['rows_out']} rows ({how})")
    console.print(f"outputs in {out}")
    for s in summaries.values():
        if s.get("report"):
            console.print(f"Report: {s['report']}")


def print_status(rows: list, out: Path) -> None:
    """``kface status``'s table (``flows.stages.StageStatus`` rows) and failed rows."""
    from rich.table import Table
    from rich.text import Text

    colour = {"done": "green", "cached": "green", "stale": "yellow", "missing": "red"}
    table = Table(title=f"kface status: {out}", caption=(
        "done: up to date, computed by the last run; cached: up to date, the last run "
        "reused it; stale: 'kface run' recomputes it (input, setting or code changed); "
        "missing: never run"))
    for col in ("stage", "state", "detail"):
        table.add_column(col)
    for row in rows:
        table.add_row(row.stage, Text(row.state, style=colour[row.state]), row.detail)
    results = stdout_console()
    results.print(table)
    for row in rows:
        for state, by_reason in sorted((row.errors or {}).items()):
            what = ("final errors (the file is not a usable image)" if state == "error" else
                    "unreadable (a passing read error: the next run retries them)")
            counts = ", ".join(f"{reason} {n}" for reason, n in sorted(by_reason.items()))
            results.print(f"{row.stage} {what}: {counts}")


def print_experiments(rows: list[dict], out: Path) -> None:
    """``kface experiments``' table (``flows.stages.evaluate.list_experiments`` rows)."""
    from rich.table import Table

    table = Table(title=f"kface experiments: {out}", caption=(
        "scored: the split the report's numbers are on (test: held-out people); "
        "model: OUT/experiments/NAME/model"))
    for col in ("experiment", "backbone", "input", "epochs", "gender", "age band",
                "within one", "scored", "training", "state"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r[k]) for k in ("name", "backbone", "input_size", "epochs",
                                             "gender", "age_band", "within_one", "scored",
                                             "training", "state")))
    stdout_console().print(table)


def print_faces(entries: list[dict], inputs: list[Path], limit: int = 20) -> None:
    """The answer on the terminal: one row per face (the first ``limit``), each photo
    named relative to the folder the inputs share."""
    from rich.table import Table

    from inference.predict import display_paths

    shown = dict(zip((e["path"] for e in entries),
                     display_paths(inputs, [e["path"] for e in entries]), strict=True))
    rows = [(e["path"], i, f) for e in entries for i, f in enumerate(e["faces"], 1)]
    if not rows:
        return
    ages = any(f.get("age") is not None for _, _, f in rows)
    table = Table("image", "face", "gender", "age band", *(["age"] if ages else []),
                  "box (left, top, right, bottom)")
    for path, i, f in rows[:limit]:
        table.add_row(shown[path], str(i),
                      f"{f['gender']} {f['gender_probs'][f['gender']]:.0%}",
                      f"{f['age_band']} {f['age_band_probs'][f['age_band']]:.0%}",
                      *([f"{f['age']:.0f}" if f.get("age") is not None else ""] if ages
                        else []),
                      ", ".join(map(str, f["box"])))
    stdout_console().print(table)
    if len(rows) > limit:
        console.print(f"... and {len(rows) - limit} more faces in predictions.json")


def report_left_out(entries: list[dict], out: Path, examples: int = 3) -> None:
    """How many photos had no face or could not be read, with a few examples (all are in
    predictions.json, with their error)."""
    for what, chosen in (("could not be read", [e for e in entries if e["error"]]),
                         ("no face", [e for e in entries
                                      if not e["error"] and not e["faces"]])):
        if chosen:
            if what == "no face":
                what = "has no face" if len(chosen) == 1 else "have no face"
            shown = "; ".join(e["path"] + (f" ({e['error']})" if e["error"] else "")
                              for e in chosen[:examples])
            say("note:", "yellow", f"{plural(len(chosen), 'image')} {what}, e.g. {shown}"
                f" (all listed in {out / 'predictions.json'})")


def print_batch(s: dict, out: Path, merged: list[Path]) -> None:
    """The batch predict flow's summary line."""
    console.print(f"{plural(s['photos'], 'image')}, {plural(s['faces'], 'face')}, "
                  f"{s['unreadable']} unreadable; {plural(s['shards'], 'shard')} "
                  f"({s['shards_reused']} reused) in {out / 'shards'}"
                  + (f"; merged {', '.join(map(str, merged))}" if merged else ""))


def print_counts(stats: dict) -> None:
    """The counts of ``inference.stats.visitor_stats``: one headline figure per class, the
    estimate with its 95% interval, and a two-line note (the rest is in the docs)."""
    from rich.table import Table

    corrected = "reference" in stats
    table = Table("class", "visitors (estimate)", "95% interval")
    for head in ("age_band", "gender", "joint"):
        for cls, c in stats[head].items():
            table.add_row(cls, f"{c['estimate']:.1f}", f"{c['low']:.1f}-{c['high']:.1f}")
    table.add_row("total", str(stats["visitors"]), "")
    stdout_console().print(table)
    for warning in stats["warnings"]:
        say("warning:", "yellow", warning)
    if not corrected:
        note = ("summed calibrated probabilities: right for a shop whose age mix is the "
                "training data's; for another, give --reference")
    elif stats.get("reference_source") == "given":
        note = ("mix-corrected: the shop's age mix estimated with the reference "
                f"{stats['reference']}")
    else:
        note = ("mix-corrected with the shipped model's own reference (labelled AAF people "
                "it never trained on; docs/model.md): for people unlike those give "
                "--reference (kface evaluate on your own labelled people); --summed sums "
                "the probabilities")
    say("note:", "yellow", note)
    console.print("(what the interval covers, and the counts by most likely class kept as "
                  "a diagnostic in stats.json: docs/training.md, 'Counts a shop can trust')")


def print_evaluation(metrics: dict, out: Path, reference: Path) -> None:
    """``kface evaluate``'s answer: warnings, accuracy per head with its interval by
    person, the age error and calibration, and where the reference for counts is."""
    from rich.table import Table

    for warning in metrics["warnings"]:
        say("warning:", "yellow", warning)
    table = Table("head", "accuracy", "95% interval (by person)", "majority class")
    for head in ("gender", "age_band"):
        m = metrics[head]
        lo, hi = m["ci95"]["accuracy"]
        table.add_row(head, f"{m['accuracy']:.3f}", f"{lo:.3f}-{hi:.3f}",
                      f"{m['baselines']['majority_class']['accuracy']:.3f}")
    stdout_console().print(table)
    extra = []
    if "age" in metrics:
        extra.append(f"age MAE {metrics['age']['mae_years']:.1f} years")
    if "calibration" in metrics:
        c = metrics["calibration"]["age_band"]
        floor = c.get("ece_floor") or {}
        extra.append(f"age-band ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f}"
                     + (f" (a calibrated model shows {floor['mean']:.3f}, up to "
                        f"{floor['p95']:.3f}, on as many faces)"
                        if floor.get("mean") is not None else ""))
    console.print(f"{metrics['examples']} faces of {metrics['subjects']} people"
                  + (f"; {', '.join(extra)}" if extra else "") + f" -> {out / 'report.md'}")
    console.print(f"for counts corrected for a shop's mix: kface stats ... --reference "
                  f"{reference}")
