"""Folder sources packed into bundles: pack/unpack round trip and unsafe archives refused.

Also source-kind detection, which needs no framework installed.
"""

from __future__ import annotations

import io
import os
import stat
import sys
import zipfile
from pathlib import Path

import pytest

import enginesmith as es
from enginesmith.errors import BundleError, MissingDependencyError, SourceError
from enginesmith.importers import IMPORTERS, ImportOptions, detect_kind
from enginesmith.importers.archive import pack_directory, unpack_directory


def make_folder(root: Path) -> Path:
    (root / "variables").mkdir(parents=True)
    (root / "assets").mkdir()
    (root / "saved_model.pb").write_bytes(b"\x08\x01graph")
    (root / "variables" / "variables.index").write_bytes(b"index")
    (root / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(4096))
    return root


def write_zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return path


def test_round_trip_keeps_files_and_empty_folders(tmp_path: Path) -> None:
    source = make_folder(tmp_path / "model")
    raw = pack_directory(source)
    archive = tmp_path / "model.dir.zip"
    archive.write_bytes(raw)
    target = unpack_directory(archive, tmp_path / "out" / "model.dir")
    assert target == tmp_path / "out" / "model.dir"
    for rel in ("saved_model.pb", "variables/variables.index", "variables/variables.data-00000-of-00001"):
        assert (target / rel).read_bytes() == (source / rel).read_bytes()
    assert (target / "assets").is_dir()


def test_packing_is_deterministic(tmp_path: Path) -> None:
    source = make_folder(tmp_path / "model")
    first = pack_directory(source)
    os.utime(source / "saved_model.pb", (1, 1))
    assert pack_directory(source) == first


def test_pack_refuses_links_and_non_folders(tmp_path: Path) -> None:
    source = make_folder(tmp_path / "model")
    (source / "link").symlink_to(tmp_path)
    with pytest.raises(SourceError, match="link"):
        pack_directory(source)
    with pytest.raises(SourceError, match="not a folder"):
        pack_directory(source / "saved_model.pb")


def test_pack_size_limit(tmp_path: Path) -> None:
    source = make_folder(tmp_path / "model")
    with pytest.raises(SourceError, match="too large"):
        pack_directory(source, max_bytes=100)


@pytest.mark.parametrize(
    "name, message",
    [
        ("/etc/evil", "absolute"),
        ("../evil", r"'\.\.'"),
        ("a/../../evil", r"'\.\.'"),
        ("C:/evil", "absolute"),
        ("a\\..\\evil", "unsafe"),
    ],
)
def test_unpack_refuses_escaping_names(tmp_path: Path, name: str, message: str) -> None:
    archive = write_zip(tmp_path / "bad.dir.zip", [(zipfile.ZipInfo(name), b"x")])
    with pytest.raises(BundleError, match=message):
        unpack_directory(archive, tmp_path / "out")
    assert not (tmp_path / "evil").exists()


def test_unpack_refuses_symlink_entries(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = write_zip(tmp_path / "bad.dir.zip", [(info, b"/etc/passwd")])
    with pytest.raises(BundleError, match="link"):
        unpack_directory(archive, tmp_path / "out")


def test_unpack_limits(tmp_path: Path) -> None:
    bomb = write_zip(tmp_path / "bomb.dir.zip", [("big", b"\0" * 200_000)])
    with pytest.raises(BundleError, match="MiB|more than"):
        unpack_directory(bomb, tmp_path / "out1", max_bytes=100_000)
    many = write_zip(tmp_path / "many.dir.zip", [(f"f{i}", b"x") for i in range(20)])
    with pytest.raises(BundleError, match="entries"):
        unpack_directory(many, tmp_path / "out2", max_entries=10)


def test_unpack_lying_sizes_are_caught(tmp_path: Path) -> None:
    """An entry that inflates to more than its header claims is refused while streaming."""
    path = write_zip(tmp_path / "liar.dir.zip", [("data", b"A" * 10_000)])
    raw = bytearray(path.read_bytes())
    # Patch the declared uncompressed size (local header and central directory) to 10 bytes.
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as archive:
        info = archive.infolist()[0]
    local = info.header_offset
    raw[local + 22 : local + 26] = (10).to_bytes(4, "little")
    central = raw.rfind(b"PK\x01\x02")
    raw[central + 24 : central + 28] = (10).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleError):
        unpack_directory(path, tmp_path / "out")


def test_unpack_refuses_garbage_and_non_empty_target(tmp_path: Path) -> None:
    garbage = tmp_path / "g.dir.zip"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="not a readable zip"):
        unpack_directory(garbage, tmp_path / "out")
    good = tmp_path / "m.dir.zip"
    good.write_bytes(pack_directory(make_folder(tmp_path / "model")))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(BundleError, match="not empty"):
        unpack_directory(good, busy)


# --------------------------------------------------------------------------- source kinds


@pytest.mark.parametrize(
    "name, kind",
    [
        ("m.keras", "keras"),
        ("m.h5", "keras"),
        ("m.hdf5", "keras"),
        ("m.pb", "tf_graph"),
        ("m.tflite", "tflite"),
        ("m.pt2", "torch"),
        ("m.pt", "torchscript"),
        ("m.pth", "torchscript"),
        ("m.onnx", "onnx"),
    ],
)
def test_detect_kind_by_suffix(tmp_path: Path, name: str, kind: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"x")
    assert detect_kind(path) == kind
    assert kind in IMPORTERS


def test_detect_kind_saved_model_folder(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "model")
    assert detect_kind(folder) == "savedmodel"
    assert detect_kind(folder / "saved_model.pb") == "savedmodel"
    with pytest.raises(SourceError, match="not a TensorFlow SavedModel"):
        detect_kind(tmp_path)
    with pytest.raises(SourceError, match="not found"):
        detect_kind(tmp_path / "missing.keras")


def test_detect_kind_objects_without_importing_frameworks() -> None:
    keras_model = type("Model", (), {"__module__": "keras.src.models.model"})
    user_model = type("MyNet", (keras_model,), {"__module__": "__main__"})
    assert detect_kind(user_model()) == "keras"
    torch_module = type("Module", (), {"__module__": "torch.nn.modules.module"})
    assert detect_kind(type("Net", (torch_module,), {"__module__": "mymodels"})()) == "torch"
    program = type("ExportedProgram", (), {"__module__": "torch.export.exported_program"})
    assert detect_kind(program()) == "torch"
    with pytest.raises(SourceError, match="unsupported model object"):
        detect_kind(object())


def test_trust_code_is_recorded_but_not_replayed() -> None:
    recorded = ImportOptions(trust_code=True, input_shapes={"x": (1, 3)}).to_dict()
    assert recorded["trust_code"] is True
    replayed = ImportOptions.from_dict(recorded)
    assert replayed.trust_code is False
    assert replayed.input_shapes == {"x": (1, 3)}


def test_missing_frameworks_name_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("tensorflow", "keras", "tf2onnx", "torch"):
        monkeypatch.setitem(sys.modules, module, None)  # makes 'import module' fail
    keras_file = write_zip(tmp_path / "m.keras", [("config.json", b"{}")])
    with pytest.raises(MissingDependencyError, match=r"pip install 'enginesmith\[tensorflow\]'"):
        es.build(keras_file)
    tflite = tmp_path / "m.tflite"
    tflite.write_bytes(b"\0\0\0\0TFL3" + b"\0" * 8)
    with pytest.raises(MissingDependencyError, match=r"enginesmith\[tensorflow\]"):
        es.build(tflite)
    program = write_zip(tmp_path / "m.pt2", [("archive/models/model.json", b"{}")])
    with pytest.raises(MissingDependencyError, match=r"pip install 'enginesmith\[torch\]'"):
        es.build(program)
