"""enginesmith map: Ray Data batch inference, checked row by row against the in-process engine.

One local Ray instance (2 CPUs) serves the whole module; each test runs real engines in real Ray
actors and reads the Parquet output back.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

import enginesmith as es  # noqa: E402
from conftest import make_mlp, make_two_in_two_out  # noqa: E402
from enginesmith.batch import MapError, map_dataset  # noqa: E402
from enginesmith.batch.columns import array_to_column  # noqa: E402
from enginesmith.cli.app import main  # noqa: E402
from enginesmith.errors import InputError, OutputExistsError, ValidationDataError  # noqa: E402
from enginesmith.samples import small_cnn  # noqa: E402
from enginesmith.signature import TensorSpec  # noqa: E402
from serve_models import build_engine, make_slow  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for attempt in range(3):  # Ray waits a fixed 30 s for its raylet to register: a busy CI host can miss it once
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            break
        except Exception:  # noqa: BLE001 - Ray raises plain Exception for a node that timed out
            ray.shutdown()
            if attempt == 2:
                raise
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("engines")
    return {
        "mlp": build_engine(make_mlp(), folder, "mlp"),
        "two": build_engine(make_two_in_two_out(), folder, "two"),
        "cnn": _engine_with_preprocessing(folder),
    }


def _engine_with_preprocessing(folder: Path) -> Path:
    """A CNN whose bundle carries its preprocessing: shorter side to 18, centre crop 16, ImageNet mean/std."""
    import onnx

    onnx.save(small_cnn(image_size=16, channels=3), folder / "cnn.onnx")
    es.build(folder / "cnn.onnx", verify=False, graph_passes=False, check_compatibility=False,
             preprocess="resize=18;crop=16;mean=0.485/0.456/0.406;std=0.229/0.224/0.225").save(folder / "cnn.engine")
    return folder / "cnn.engine"


def tensor_column(values: np.ndarray) -> pa.Array:
    return array_to_column(values, TensorSpec("x", str(values.dtype), ("batch", *values.shape[1:])))


def write_mlp_input(path: Path, rows: int, seed: int = 0, start: int = 0, row_group: int = 50) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, 6)).astype(np.float32)
    ids = pa.array([f"row-{start + i}" for i in range(rows)])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "x": tensor_column(x), "label": np.arange(rows)}), path, row_group_size=row_group)
    return x


def read_output(folder: Path) -> pa.Table:
    return pq.read_table(folder)


def by_id(table: pa.Table, column: str) -> dict:
    ids = table.column(table.column_names[0]).to_pylist()
    values = table.column(column).to_pylist()
    return dict(zip(ids, values))


def test_parquet_folder_rows_equal_the_in_process_engine(tmp_path, engines):
    x1 = write_mlp_input(tmp_path / "in" / "a.parquet", 230, seed=1)
    x2 = write_mlp_input(tmp_path / "in" / "sub" / "b.parquet", 170, seed=2, start=230)
    seen = []
    report = map_dataset(engines["mlp"], tmp_path / "in", tmp_path / "out.parquet", part_rows=100, batch_size=32,
                         workers=2, progress=lambda stage, done, total: seen.append((stage, done, total)))

    table = read_output(tmp_path / "out.parquet")
    assert table.column_names == ["id", "probs"]
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(f"row-{i}" for i in range(400)) and len(ids) == len(set(ids))
    expected = es.load(engines["mlp"])(x=np.concatenate([x1, x2]))["probs"]
    got = np.array(table.column("probs").to_pylist(), np.float32)
    order = [int(i.removeprefix("row-")) for i in ids]
    np.testing.assert_allclose(got, expected[order], rtol=1e-6, atol=1e-7)
    # parts follow row groups (50 rows): 100-row parts, the last of each file shorter
    assert (report.rows, report.parts, report.parts_computed, report.rows_computed) == (400, 5, 5, 400)
    assert sorted(p.name for p in (tmp_path / "out.parquet").glob("part-*")) == [
        f"part-{n:012d}.parquet" for n in (0, 100, 200, 230, 330)]
    assert json.loads((tmp_path / "out.parquet" / "_enginesmith_map.json").read_text())["complete"] is True
    assert seen[0] == ("map", 0, 400) and seen[-1] == ("map", 400, 400) and len(seen) == 6  # once per part


def test_list_and_tensor_columns_with_row_numbers_as_ids(tmp_path, engines):
    from ray.data._internal.tensor_extensions.arrow import ArrowTensorArray

    rng = np.random.default_rng(3)
    left, right = rng.standard_normal((2, 90, 3))
    # left: plain variable lists of float64 (cast to float32), right: Ray's tensor extension; no id column
    pq.write_table(pa.table({"left": pa.array(left.tolist()), "right": ArrowTensorArray.from_numpy(right.astype(np.float32))}),
                   tmp_path / "in.parquet", row_group_size=30)
    report = map_dataset(engines["two"], tmp_path / "in.parquet", tmp_path / "out", part_rows=30)

    table = read_output(tmp_path / "out")
    assert table.column_names == ["id", "score", "ids"] and report.id_column == "id"
    assert table.column("id").to_pylist() == list(range(90))  # the row number is the id
    expected = es.load(engines["two"])(left=left.astype(np.float32), right=right.astype(np.float32))
    np.testing.assert_allclose(np.array(table.column("score").to_pylist()), expected["score"], rtol=1e-6, atol=1e-6)
    assert table.column("ids").to_pylist() == expected["ids"].tolist()
    assert table.schema.field("ids").type == pa.int64()
    assert report.notes == ["column 'left' is read as float32 (it holds float64)"]


def test_image_folder_uses_relative_paths_as_ids(tmp_path, engines):
    from PIL import Image

    rng = np.random.default_rng(4)
    paths = []
    for i in range(12):
        path = tmp_path / "images" / ("cats" if i % 2 else "dogs") / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    report = map_dataset(engines["cnn"], tmp_path / "images", tmp_path / "out", part_rows=5, batch_size=4)

    table = read_output(tmp_path / "out")
    engine = es.load(engines["cnn"])
    assert engine.manifest.preprocess["center_crop"] == [16, 16]
    expected = engine(es.api.image_inputs(engine, paths))["probs"]  # the bundle's preprocessing, in-process
    got = by_id(table, "probs")
    assert sorted(got) == sorted(p.relative_to(tmp_path / "images").as_posix() for p in paths)
    for path, row in zip(paths, expected):
        np.testing.assert_allclose(got[path.relative_to(tmp_path / "images").as_posix()], row, rtol=1e-5, atol=1e-6)
    assert (report.input_kind, report.parts) == ("images", 3)


def test_rerun_computes_only_the_missing_parts(tmp_path, engines):
    write_mlp_input(tmp_path / "in.parquet", 300, row_group=50)
    out = tmp_path / "out"
    first = map_dataset(engines["mlp"], tmp_path / "in.parquet", out, part_rows=50)
    before = read_output(out).sort_by("id")
    parts = sorted(out.glob("part-*.parquet"))
    assert first.parts_computed == 6
    kept = {p.name: p.stat().st_mtime_ns for p in parts[2:]}
    for lost in parts[:2]:
        lost.unlink()
    (out / ".part-000000000050.parquet.abc.tmp").write_bytes(b"half a part")  # a killed run's leftover

    second = map_dataset(engines["mlp"], tmp_path / "in.parquet", out, part_rows=50)

    assert (second.parts_computed, second.parts_skipped, second.rows_computed) == (2, 4, 100)
    assert {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("part-*.parquet"))[2:]} == kept  # not rewritten
    assert read_output(out).sort_by("id").equals(before)
    assert not list(out.glob(".*tmp"))
    third = map_dataset(engines["mlp"], tmp_path / "in.parquet", out, part_rows=50)
    assert (third.parts_computed, third.rows_computed) == (0, 0)


def test_rerun_refuses_results_of_another_input_or_engine(tmp_path, engines):
    write_mlp_input(tmp_path / "in.parquet", 60)
    out = tmp_path / "out"
    map_dataset(engines["mlp"], tmp_path / "in.parquet", out, part_rows=50)
    with pytest.raises(OutputExistsError, match="rows per part was 50, now 20"):
        map_dataset(engines["mlp"], tmp_path / "in.parquet", out, part_rows=20)
    retrained = build_engine(make_mlp(seed=7), tmp_path, "mlp")
    with pytest.raises(OutputExistsError, match="engine 'mlp.engine' was another file"):
        map_dataset(retrained, tmp_path / "in.parquet", out, part_rows=50)
    write_mlp_input(tmp_path / "in.parquet", 60, seed=9)  # same shape, other values
    with pytest.raises(OutputExistsError, match="input .* has changed.*--force"):
        map_dataset(engines["mlp"], tmp_path / "in.parquet", out, part_rows=50)
    report = map_dataset(engines["mlp"], tmp_path / "in.parquet", out, part_rows=20, force=True)
    # a part never splits a row group (50 rows here): 50 + 10 rows, and the report says so
    assert report.parts_computed == 2 and sorted(p.name for p in out.glob("part-*")) == [
        "part-000000000000.parquet", "part-000000000050.parquet"]
    assert report.notes == ["'in.parquet' has row groups of up to 50 rows, more than a part's 20; a part never splits a "
                            "row group, so these parts are larger (fewer to share among workers, more to redo after a "
                            "crash): write the file with smaller row groups, e.g. pyarrow's row_group_size=4096"]


def _worker_writing_a_part():
    """A worker process of this test's Ray instance that has a part's temporary file open, with the file."""
    import psutil

    for child in psutil.Process().children(recursive=True):  # only this test's own Ray instance
        try:
            if "PartWriter" not in " ".join(child.cmdline()):
                continue
            for handle in child.open_files():
                if Path(handle.path).name.startswith(".part-"):
                    return child, Path(handle.path).name
        except psutil.Error:
            pass
    return None, None


def test_killed_worker_loses_no_rows_and_duplicates_none(tmp_path):
    engine = build_engine(make_slow(width=768, layers=12), tmp_path, "slow")
    x = np.random.default_rng(5).standard_normal((480, 768)).astype(np.float32)
    pq.write_table(pa.table({"id": np.arange(1000, 1480), "x": tensor_column(x)}), tmp_path / "in.parquet",
                   row_group_size=40)
    out = tmp_path / "out"
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(report=map_dataset(
        engine, tmp_path / "in.parquet", out, part_rows=40, batch_size=8, workers=2)))
    runner.start()
    victim, part = None, None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline and runner.is_alive():
        if list(out.glob("part-*.parquet")):  # mid-run: some parts done, one being written by the victim
            victim, part = _worker_writing_a_part()
            if victim is not None:
                os.kill(victim.pid, signal.SIGKILL)
        time.sleep(0.02)
    runner.join(timeout=300)
    assert victim is not None, "no worker was found mid-run to kill"
    report = result["report"]

    table = read_output(out)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == list(range(1000, 1480))  # every row exactly once
    expected = es.load(engine)(x=x)["y"]
    got = np.array(table.column("y").to_pylist(), np.float32)
    np.testing.assert_allclose(got, expected[np.array(ids) - 1000], rtol=1e-4, atol=1e-5)
    assert (report.rows, report.parts_computed) == (480, 12)
    killed_part = part.removeprefix(".").split(".parquet")[0] + ".parquet"
    assert pq.read_table(out / killed_part).num_rows == 40  # the part it was writing was written again, whole
    assert not list(out.glob(".*tmp"))


# --------------------------------------------------------------------------- bad input


def test_missing_column_names_what_the_engine_takes(tmp_path, engines):
    pq.write_table(pa.table({"id": [1, 2], "features": tensor_column(np.zeros((2, 6), np.float32))}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match=r"no column 'x' for engine input 'x'; the engine takes x \(float32\[batch, 6\]\), "
                                         r"the file has columns id, features"):
        map_dataset(engines["mlp"], tmp_path / "in.parquet", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("column, message", [
    (pa.array(["a", "b"]), r"column 'x' holds string values, not numbers"),
    (tensor_column(np.zeros((2, 5), np.float32)), r"axis 1 is 5, the engine needs 6"),
    (tensor_column(np.zeros((2, 6), np.int64)) if False else pa.array([[1.5] * 6] * 2, pa.list_(pa.float64(), 6)), None),
])
def test_wrong_dtype_or_shape(tmp_path, engines, column, message):
    pq.write_table(pa.table({"x": column}), tmp_path / "in.parquet")
    if message is None:  # float64 -> float32 keeps the values: accepted, with a note
        report = map_dataset(engines["mlp"], tmp_path / "in.parquet", tmp_path / "out")
        assert report.rows == 2 and report.notes
        return
    with pytest.raises(InputError, match=message):
        map_dataset(engines["mlp"], tmp_path / "in.parquet", tmp_path / "out")


def test_float_column_for_an_integer_input_is_refused(tmp_path):
    from conftest import make_int_input_model

    engine = build_engine(make_int_input_model(), tmp_path, "ints")
    pq.write_table(pa.table({"ids": tensor_column(np.ones((3, 4), np.float32))}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match=r"float32 -> int64 cast would change values"):
        map_dataset(engine, tmp_path / "in.parquet", tmp_path / "out")


def test_ragged_rows_fail_with_the_column_named(tmp_path, engines):
    pq.write_table(pa.table({"x": pa.array([[0.0] * 6, [0.0] * 5])}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match="column 'x' has rows of different lengths"):
        map_dataset(engines["mlp"], tmp_path / "in.parquet", tmp_path / "out")
    assert not list((tmp_path / "out").glob("part-*"))  # nothing half-written


def test_missing_input_and_occupied_output(tmp_path, engines):
    with pytest.raises(ValidationDataError, match="input not found"):
        map_dataset(engines["mlp"], tmp_path / "nope.parquet", tmp_path / "out")
    write_mlp_input(tmp_path / "in.parquet", 4)
    (tmp_path / "taken.parquet").write_text("precious")
    with pytest.raises(OutputExistsError, match="refusing to overwrite the existing file .*--force"):
        map_dataset(engines["mlp"], tmp_path / "in.parquet", tmp_path / "taken.parquet")
    assert (tmp_path / "taken.parquet").read_text() == "precious"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not an enginesmith map output"):
        map_dataset(engines["mlp"], tmp_path / "in.parquet", tmp_path / "folder", force=True)
    write_mlp_input(tmp_path / "data" / "in.parquet", 4)
    with pytest.raises(OutputExistsError, match="overlaps the input"):
        map_dataset(engines["mlp"], tmp_path / "data", tmp_path / "data" / "inside")


def test_cli_map_and_its_one_line_errors(tmp_path, engines, capsys):
    write_mlp_input(tmp_path / "in.parquet", 120)
    out = tmp_path / "out.parquet"
    code = main(["map", str(engines["mlp"]), "--input", str(tmp_path / "in.parquet"), "-o", str(out),
                 "--part-rows", "50", "--json", str(tmp_path / "map.json")])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "wrote" in printed.out and "120" in printed.out
    summary = json.loads((tmp_path / "map.json").read_text())
    assert (summary["rows"], summary["parts_computed"]) == (120, 3)
    assert read_output(out).num_rows == 120

    (tmp_path / "file.parquet").write_text("x")
    for args, message in [
        (["--input", str(tmp_path / "missing.parquet"), "-o", str(tmp_path / "o1")], "input not found"),
        (["--input", str(tmp_path / "in.parquet"), "-o", str(tmp_path / "file.parquet")], "refusing to overwrite"),
        (["--input", str(tmp_path / "in.parquet"), "-o", str(out), "--part-rows", "7"], "add --force to start over"),
        (["--input", str(tmp_path / "in.parquet"), "-o", str(tmp_path / "o2"), "--id-column", "key"], "no id column 'key'"),
    ]:
        code = main(["map", str(engines["mlp"]), *args])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_worker_layout_places_one_engine_per_gpu_or_per_cpus():
    from enginesmith.batch.run import _worker_layout

    # a GPU engine: one worker per GPU, each reserving one GPU (Ray gives each its own CUDA_VISIBLE_DEVICES)
    assert vars(_worker_layout({"CPU": 32, "GPU": 2}, None, True, None, None, parts=50)) == {"workers": 2, "cpus": 1.0, "gpus": 1.0}
    # a CPU engine: one worker per --cpus-per-worker CPUs, never more workers than parts
    assert vars(_worker_layout({"CPU": 8}, None, False, None, 2, parts=50)) == {"workers": 4, "cpus": 2, "gpus": 0.0}
    assert _worker_layout({"CPU": 8}, None, False, None, None, parts=3).workers == 3
    with pytest.raises(MapError, match="the engine runs on a GPU but the Ray cluster has 0 GPUs"):
        _worker_layout({"CPU": 8}, None, True, None, None, parts=5)


def test_default_parts_split_the_input_evenly_within_size_bounds():
    from enginesmith.batch.plan import default_part_rows
    from enginesmith.runtime.preprocess import PreprocessSpec
    from enginesmith.signature import Signature

    vectors = Signature((TensorSpec("x", "float32", ("batch", 512)),), (TensorSpec("y", "float32", ("batch", 16)),))
    assert default_part_rows(vectors, 100_000) == 1563  # about 64 parts
    assert default_part_rows(vectors, 1000) == 512  # but at least 1 MB of input per part
    assert default_part_rows(vectors, 10**9) == 16384  # and at most 16384 rows
    images = Signature((TensorSpec("image", "float32", ("batch", 3, 224, 224)),), vectors.outputs)
    assert default_part_rows(images, 500, PreprocessSpec(resize=256, center_crop=(224, 224))) == 8
    assert default_part_rows(images, 10**7) == 111  # 64 MB of 224x224x3 float32


def test_load_threads_override_sizes_each_worker_engine(engines):
    # map's workers load their engine with as many intra-op threads as CPUs they reserve
    engine = es.load(engines["mlp"], threads=1)
    assert engine._session._session.get_session_options().intra_op_num_threads == 1


@pytest.mark.parametrize("shape, dtype", [(("batch", 2, 3), "float32"), (("batch", "n", 3), "float16"),
                                          (("batch",), "int64"), (("batch", 4), "bool")])
def test_output_columns_read_back_as_the_arrays_written(shape, dtype):
    from enginesmith.batch.columns import column_to_array, output_type

    spec = TensorSpec("t", dtype, shape)
    value = (np.random.default_rng(0).standard_normal((5, *[3 if d == "n" else d for d in shape[1:]])) * 4).astype(dtype)
    column = array_to_column(value, spec)
    assert column.type == output_type(spec)  # every part gets the schema known before anything runs
    np.testing.assert_array_equal(column_to_array("t", column, spec), value)
