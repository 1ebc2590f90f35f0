"""The candidates tables of a build: ``--precision best``'s precisions and ``--backend auto``'s backends."""

from __future__ import annotations

from typing import Optional

from rich.markup import escape

from ..pipeline.selection import parse_strategy
from ..validate import AccuracyBudget
from .app import add_columns, console, table


def budget_rule(budget: Optional[AccuracyBudget], resolution: Optional[str]) -> str:
    rule = str(budget) if budget else "default tolerances"
    if budget is not None and budget.metric == "agreement" and resolution:
        rule += f"; {resolution}"  # what the agreement column can resolve
    return rule


def judged_by_map(rows: list[dict]) -> bool:
    """Candidates checked against a map budget: their mAP columns replace top-1 agreement (meaningless for detectors)."""
    return any("map_drop_points" in row for row in rows)


def quality_cells(row: dict, budget: Optional[AccuracyBudget], by_map: bool, agreement_format: str) -> list[str]:
    """A candidate's accuracy cells: engine mAP and points lost, or its top-1 agreement."""
    if by_map:
        key = "map50" if budget is not None and budget.metric == "map50" else "map"
        return [f"{row['engine_map'][key]:.4f}", f"{row['map_drop_points']:.2f}"] if "engine_map" in row else ["", ""]
    agreement = row.get("argmax_agreement")
    return ["" if agreement is None else agreement_format.format(agreement)]


def print_candidates(candidates: list[dict], budget: Optional[AccuracyBudget], resolution: Optional[str] = None) -> None:
    tbl = table(escape(f"precision candidates (budget: {budget_rule(budget, resolution)})"))
    by_map = judged_by_map(candidates)
    quality = ["engine mAP", "mAP drop (points)"] if by_map else ["top-1 agreement"]
    add_columns(tbl, "precision", "p50 ms", "worst rel L2", *quality, "kept", "why")
    for row in candidates:
        tbl.add_row(
            row["precision"],
            f"{row['p50_ms']:.3f}" if "p50_ms" in row else "",
            f"{row['worst_rel_l2']:.2e}" if "worst_rel_l2" in row else "",
            *quality_cells(row, budget, by_map, "{:.2%}"),
            "[green]yes[/]" if row["kept"] else "no",
            escape(row["reason"]),
        )
    console.print(tbl)


def print_backend_candidates(manifest_data: dict) -> None:
    """``--backend auto``'s table: each candidate's speed, accuracy, whether it was chosen and why, and its seconds."""
    rows = manifest_data["checks"]["backend_candidates"]
    strategy = parse_strategy((manifest_data["build_options"].get("auto") or {}).get("select"))
    recorded = manifest_data.get("accuracy_budget")
    budget = AccuracyBudget.from_dict(recorded) if recorded else None
    rule = budget_rule(budget, (manifest_data["checks"].get("calibration") or {}).get("resolution"))
    batch = max((row.get("throughput_batch", 1) for row in rows), default=1)
    how = strategy.describe() + (f", items/s at batch {batch}" if strategy.needs_throughput else "")
    tbl = table(escape(f"backend candidates (auto: {how}; budget: {rule})"),
                caption="s: seconds to build / verify / time it")
    by_map = judged_by_map(rows)
    quality = ["mAP", "mAP drop"] if by_map else ["top-1"]
    numeric = ("p50 ms", "items/s", "rel L2", *quality, "s")
    columns = ["candidate", "p50 ms", *(["items/s"] if strategy.needs_throughput else []), "rel L2", *quality, "why", "s"]
    add_columns(tbl, *columns, right=numeric)
    for row in rows:
        tput = row.get("throughput")
        why = ("[green]chosen[/]: " if row.get("chosen") else "") + escape(row.get("reason", ""))
        tbl.add_row(
            escape(f"{row['backend']} {row.get('precision', '')}".strip()
                   + (f", {row['threads']} thread{'s' if row['threads'] > 1 else ''}" if row.get("threads") else "")),
            f"{row['p50_ms']:.2f}" if "p50_ms" in row else "",
            *([f"{tput:.0f}" if tput is not None else ""] if strategy.needs_throughput else []),
            f"{row['worst_rel_l2']:.0e}" if "worst_rel_l2" in row else "",
            *quality_cells(row, budget, by_map, "{:.0%}"),
            why,
            "/".join(f"{row[key]:.1f}" if key in row else "-" for key in ("build_s", "verify_s", "time_s"))
            if "build_s" in row else "",
        )
    console.print(tbl)
