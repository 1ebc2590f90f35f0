"""Class names: from a file (one name per line, or JSON) or from the model's metadata (ultralytics' 'names')."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from ..errors import InputError


def read_names_file(path: str | Path) -> list[str]:
    """One name per line (blank lines ignored), or a JSON list, or a JSON object {"0": "person", ...}."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read class names from '{path}': {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            return _names_from_object(json.loads(text))
        except (ValueError, TypeError) as exc:
            raise InputError(f"'{path}' is not a JSON list of names or an object of id -> name: {exc}") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise InputError(f"class names file '{path}' is empty; write one name per line")
    return names


def names_from_metadata(metadata: dict[str, str]) -> list[str] | None:
    """ultralytics writes ``names`` as a Python dict literal, "{0: 'person', 1: 'bicycle'}"; read safely
    (literal_eval evaluates literals only, never code)."""
    text = metadata.get("names")
    if not text:
        return None
    try:
        return _names_from_object(ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        try:
            return _names_from_object(json.loads(text))
        except (ValueError, TypeError):
            return None


def _names_from_object(data) -> list[str]:
    if isinstance(data, list) and all(isinstance(n, str) for n in data):
        return list(data)
    if isinstance(data, dict):
        ids = sorted(int(k) for k in data)
        if ids != list(range(len(ids))):
            raise ValueError("ids must run 0, 1, 2, ... without gaps")
        return [str(data[k] if k in data else data[str(k)]) for k in ids]
    raise TypeError(f"expected a list or an object, got {type(data).__name__}")


def check_names(names: list[str], classes: int | None, first_class: int, where: str) -> None:
    """A names list must have one name per class the model scores."""
    if classes is not None and len(names) != classes:
        raise InputError(
            f"{where} has {len(names)} class names but the model scores {classes} classes; "
            f"give a file with {classes} names, one per line"
        )


def label_for(class_id: int, names: list[str] | None, first_class: int) -> str:
    index = class_id - first_class
    if names and 0 <= index < len(names):
        return names[index]
    return str(class_id)
