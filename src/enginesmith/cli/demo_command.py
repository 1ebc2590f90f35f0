"""``enginesmith demo``: train, build, validate and benchmark on the CPU in one go."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..bench import times_text
from ..errors import OutputExistsError

from .app import add_columns, app, console, print_indented, table


@app.command(short_help="Train a Keras CNN on digits, build, validate and benchmark its engine.")
def demo(
    output: Path = typer.Option(Path("enginesmith-demo"), "-o", "--output", metavar="DIR", help="Folder for the model, engine, JSON and plot."),
    epochs: int = typer.Option(30, min=1, metavar="N", help="Training epochs."),
    runs: int = typer.Option(50, min=1, metavar="N", help="Timed runs per target and batch size."),
    force: bool = typer.Option(False, "--force", help="Replace files of the same names in DIR that an earlier demo did not write."),
) -> None:
    """Train a Keras CNN on scikit-learn's digits, build an engine, validate it and benchmark it."""
    from ..demo import DEMO_FILES, is_demo_folder, run_demo

    clashes = [name for name in DEMO_FILES if (output / name).exists()]
    if clashes and not force and not is_demo_folder(output):
        raise OutputExistsError(
            f"'{output}' already holds {', '.join(clashes)}, not written by an earlier demo; "
            "give another folder with -o DIR, or add --force"
        )

    result = run_demo(output, epochs=epochs, bench_runs=runs, log=lambda line: print_indented(line, 0))
    for step in result.steps:
        print_indented(step)
    results = table("digits CNN on this CPU: p50 latency (ms) and speed-up of the engine")
    add_columns(results, "target", "batch", "p50 ms", "p90 ms", "items/s", "engine speed-up",
                right=("batch", "p50 ms", "p90 ms", "items/s", "engine speed-up"))
    ratios = result.benchmark["p50_relative_to_engine"]
    for r in result.benchmark["results"]:
        speedup = ratios["batch " + str(r["batch"])][r["label"]]
        results.add_row(escape(r["label"]), str(r["batch"]), f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}",
                        f"{r['throughput']:,.0f}", "" if r["label"] == "engine" else times_text(speedup))
    console.print(results)
    console.print(f"test accuracy: Keras {result.keras_test_accuracy:.2%}, engine {result.engine_test_accuracy:.2%}")
    console.print(f"wrote {output / 'demo.json'} and {output / 'demo.png'}", markup=False, highlight=False)
