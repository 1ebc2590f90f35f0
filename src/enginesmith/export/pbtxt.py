"""Protocol-buffer text format (what Triton's ``config.pbtxt`` is) from nested dicts.

A message is a dict; a list repeats its key (a list of scalars is written ``[a, b]``); an
:class:`EnumValue` is written bare (``TYPE_FP32``), strings quoted. Map fields are lists of
``{"key": ..., "value": ...}`` messages, which is how the text format spells them. Kept here rather
than going through ``google.protobuf.text_format`` so that exporting needs no generated Triton
classes; the tests parse every file this writes with Triton's own ``ModelConfig`` schema.
"""

from __future__ import annotations

from typing import Any, Mapping


class EnumValue(str):
    """An enum constant: written without quotes."""


def _scalar(value: Any) -> str:
    if isinstance(value, EnumValue):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if any(ord(c) < 0x20 for c in value):
            raise ValueError(f"control character in text-format string {value!r}")
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {type(value).__name__} in protobuf text format")


def _lines(message: Mapping[str, Any], depth: int) -> list[str]:
    pad = "  " * depth
    out: list[str] = []
    for key, value in message.items():
        if isinstance(value, list) and value and not isinstance(value[0], Mapping):
            out.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, Mapping):
                body = _lines(item, depth + 1)
                out.extend([f"{pad}{key} {{", *body, f"{pad}}}"] if body else [f"{pad}{key} {{ }}"])
            else:
                out.append(f"{pad}{key}: {_scalar(item)}")
    return out


def to_text(message: Mapping[str, Any]) -> str:
    return "\n".join(_lines(message, 0)) + "\n"
