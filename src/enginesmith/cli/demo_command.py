"""``enginesmith demo``: train, build, validate and benchmark on the CPU in one go."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from .app import app, console


@app.command()
def demo(
    output: Path = typer.Option(Path("enginesmith-demo"), "-o", "--output", help="Folder for the model, engine, JSON and plot."),
    epochs: int = typer.Option(30, help="Training epochs."),
    runs: int = typer.Option(50, help="Timed runs per target and batch size."),
) -> None:
    """Train a Keras CNN on scikit-learn's digits, build an engine, validate it and benchmark it."""
    from ..demo import run_demo

    result = run_demo(output, epochs=epochs, bench_runs=runs, log=lambda line: console.print(line, markup=False))
    for step in result.steps:
        console.print(f"  {step}", markup=False, highlight=False)
    table = Table(title="digits CNN on this CPU: p50 latency (ms) and speed-up of the engine")
    for column in ("target", "batch", "p50 ms", "p90 ms", "items/s", "engine speed-up"):
        table.add_column(column, justify="left" if column == "target" else "right")
    ratios = result.benchmark["p50_relative_to_engine"]
    for r in result.benchmark["results"]:
        speedup = ratios["batch " + str(r["batch"])][r["label"]]
        table.add_row(escape(r["label"]), str(r["batch"]), f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}",
                      f"{r['throughput']:,.0f}", f"{speedup:.1f}x")
    console.print(table)
    console.print(f"test accuracy: Keras {result.keras_test_accuracy:.2%}, engine {result.engine_test_accuracy:.2%}")
    console.print(f"wrote {output / 'demo.json'} and {output / 'demo.png'}", markup=False)
