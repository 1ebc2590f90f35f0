"""Fuzzing the bundle loader: every damaged engine file is refused with a BundleError, never another exception.

Mutations of a real small engine: random byte flips, truncations, damage near the zip's central
directory and inside the (deflated) manifest entry. A mutation that still loads must give the
same outputs as the intact engine: damage that matters is caught by the checksums.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_mlp

import enginesmith as es
from enginesmith.bundle import MANIFEST_NAME

MUTATIONS = 300


def _manifest_span(path: Path) -> tuple[int, int]:
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(MANIFEST_NAME)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        return start, start + info.compress_size


def _central_directory_start(data: bytes) -> int:
    return data.rfind(b"PK\x01\x02", 0, data.rfind(b"PK\x05\x06"))


def _mutate(data: bytes, rng: np.random.Generator, manifest: tuple[int, int]) -> tuple[str, bytes]:
    kind = ("flip", "truncate", "central_directory", "manifest")[int(rng.integers(4))]
    buf = bytearray(data)
    if kind == "truncate":
        return kind, bytes(buf[: int(rng.integers(0, len(buf)))])
    if kind == "flip":
        low, high = 0, len(buf)
    elif kind == "central_directory":
        # The directory entries and the end record: where zipfile looks first.
        low, high = max(0, data.rfind(b"PK\x01\x02") - 200), len(buf)
    else:
        low, high = manifest
    for _ in range(int(rng.integers(1, 9))):
        pos = int(rng.integers(low, high))
        buf[pos] ^= int(rng.integers(1, 256))
    return kind, bytes(buf)


def test_every_damaged_bundle_is_a_bundle_error_or_still_correct(tmp_path):
    original = tmp_path / "mlp.engine"
    es.build(make_mlp()).save(original)
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)}
    expected = es.load(original)(feeds)["probs"]
    data = original.read_bytes()
    manifest = _manifest_span(original)
    assert _central_directory_start(data) > manifest[1]
    rng = np.random.default_rng(20261130)
    outcomes: dict[str, int] = {}
    target = tmp_path / "mutant.engine"
    for i in range(MUTATIONS):
        kind, mutant = _mutate(data, rng, manifest)
        target.write_bytes(mutant)
        try:
            engine = es.load(target)
        except es.BundleError as exc:
            assert str(exc) and "\n" not in str(exc), (i, kind, str(exc))
            outcomes[f"{kind}: refused"] = outcomes.get(f"{kind}: refused", 0) + 1
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"mutation {i} ({kind}) raised {type(exc).__name__}, not a BundleError: {exc}")
        # Loaded: the damage hit bytes nothing reads (timestamps, comments), so outputs are intact.
        np.testing.assert_array_equal(engine(feeds)["probs"], expected, err_msg=f"mutation {i} ({kind})")
        outcomes[f"{kind}: loaded, outputs intact"] = outcomes.get(f"{kind}: loaded, outputs intact", 0) + 1
    # Every kind of damage was exercised and most of it refused.
    for kind in ("flip", "truncate", "central_directory", "manifest"):
        assert outcomes.get(f"{kind}: refused", 0) > 0, outcomes
    assert outcomes.get("manifest: loaded, outputs intact", 0) == 0, outcomes
