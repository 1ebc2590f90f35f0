"""A torch-backend build from a torch source runs the source's ONNX export in a child process alongside the
engine's build (importers/onnx_job.py, pipeline/stages.py): same ONNX as the sequential import, failures
recorded without failing the engine, and no child process left behind."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import run_plain

torch = pytest.importorskip("torch")
psutil = pytest.importorskip("psutil")
if importlib.util.find_spec("onnxscript") is None:
    pytest.skip("the dynamo ONNX exporter (onnxscript) is not installed", allow_module_level=True)

import enginesmith as es  # noqa: E402
from enginesmith.errors import BuildError, UnsupportedModelError, ValidationDataError  # noqa: E402
from enginesmith.importers import ImportOptions, import_model  # noqa: E402
from torch import nn  # noqa: E402
from torch_models import MeanHead, TinyEncoder  # noqa: E402

# onnx_export=alongside: the default (auto) runs it alongside only from 4 usable cores; CI machines may have 2.
EAGER = {"device": "cpu", "compile": "eager", "onnx_export": "alongside"}


class RunningMax(nn.Module):
    """torch.cummax: torch.export and eager torch run it; neither ONNX exporter has a conversion for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x, dim=-1)[0] * 2.0


def children() -> list:
    return [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def encoder_case():
    torch.manual_seed(0)
    module = TinyEncoder().eval()
    example = {"input_ids": torch.randint(0, 50, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.int64)}
    return module, ImportOptions(example_inputs=example, dynamic_axes={"input_ids": [1], "attention_mask": [1]})


def test_background_import_gives_the_sequential_onnx_and_signature():
    module, options = encoder_case()
    sequential = import_model(module, options)
    background = import_model(module, ImportOptions(**{**options.__dict__, "onnx_in_background": True}))
    assert background.model is None and background.pending_onnx is not None
    assert psutil.pid_exists(background.pending_onnx.pid)
    # Read off the torch program before the conversion finished; the same as the ONNX's.
    assert background.signature == sequential.signature
    assert str(background.signature.input("input_ids")) == "input_ids: int64[batch, input_ids_1]"
    joined = background.with_onnx()
    assert joined.pending_onnx is None and joined.model is not None
    assert joined.signature == sequential.signature
    assert any("alongside the build" in line for line in joined.log)
    assert joined.source_bytes == sequential.source_bytes  # the bundle's portable source is unchanged
    rng = np.random.default_rng(3)
    feeds = {"input_ids": rng.integers(0, 50, (3, 7)).astype(np.int64),
             "attention_mask": np.ones((3, 7), np.int64)}
    want, got = run_plain(sequential.model, feeds), run_plain(joined.model, feeds)
    assert set(got) == {"last_hidden_state", "pooler_output"}
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    assert not children()


def test_torch_build_runs_the_onnx_export_alongside_and_its_bundle_rebuilds_for_onnxruntime(tmp_path: Path):
    torch.manual_seed(0)
    module = MeanHead().eval()
    x = torch.randn(2, 3, 16, 16)
    steps: list[str] = []
    engine = es.build(module, backend="torch", backend_options=EAGER, import_options=ImportOptions(example_inputs=(x,)),
                      output=tmp_path / "mean.engine", progress=lambda stage, done, total: steps.append(stage))
    assert not children()
    checks = engine.manifest.checks
    record = checks["onnx_export"]
    assert record["ok"] is True and record["alongside_build"] is True
    assert record["seconds"] > 0 and 0 <= record["waited_s"] <= checks["stages"]["package"] + 1e-3
    assert "waiting for the ONNX export" in steps
    assert checks["build"]["source"] == "torch"
    assert checks["compatibility"]["counts"]["unsupported"] == 0  # the report made once the ONNX was joined
    log = engine.manifest.build_log
    assert any(line.startswith("converted with torch.onnx.export(dynamo=True)") for line in log)
    assert engine.manifest.signature == import_model(module, ImportOptions(example_inputs=(x,))).signature
    # The bundle's source rebuilds with a backend that needs the ONNX, and agrees with the module.
    rebuilt = es.build(tmp_path / "mean.engine", backend="onnxruntime")
    assert "onnx_export" not in rebuilt.manifest.checks  # another backend converts before building, as before
    feeds = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(feeds)).numpy()
    np.testing.assert_allclose(engine(x=feeds)["output"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rebuilt(x=feeds)["output"], want, rtol=1e-4, atol=1e-5)


def test_a_failed_onnx_export_leaves_the_torch_engine_with_a_warning(tmp_path: Path):
    module = RunningMax()
    x = torch.randn(2, 4, 6)
    engine = es.build(module, backend="torch", backend_options=EAGER, import_options=ImportOptions(example_inputs=(x,)),
                      output=tmp_path / "max.engine")
    assert not children()
    record = engine.manifest.checks["onnx_export"]
    assert record["ok"] is False
    assert "torch.onnx cannot export the model" in record["error"] and "cummax" in record["error"]
    assert any(line.startswith("warning: the ONNX export failed") for line in engine.manifest.build_log)
    assert "compatibility" not in engine.manifest.checks
    feeds = np.random.default_rng(2).standard_normal((3, 4, 6)).astype(np.float32)
    np.testing.assert_allclose(engine(x=feeds)["output"], module(torch.from_numpy(feeds)).numpy(), rtol=1e-6)
    # The bundle keeps the torch program: it rebuilds with the torch backend anywhere ...
    again = es.build(tmp_path / "max.engine", backend="torch")  # the bundle's recorded options, onnx_export too
    np.testing.assert_allclose(again(x=feeds)["output"], module(torch.from_numpy(feeds)).numpy(), rtol=1e-6)
    # ... and a backend that builds from the ONNX reports the exporters' error, as a torch source always did.
    with pytest.raises(UnsupportedModelError, match="torch.onnx cannot export the model"):
        es.build(module, backend="onnxruntime", import_options=ImportOptions(example_inputs=(x,)))
    assert not children()


def test_a_build_that_fails_or_is_interrupted_stops_the_onnx_export(tmp_path: Path):
    module = MeanHead().eval()
    options = ImportOptions(example_inputs=(torch.randn(2, 3, 16, 16),))
    folders_before = set(Path(tempfile.gettempdir()).glob("enginesmith-onnx-*"))
    with pytest.raises(ValidationDataError, match="needs 3 on axis 1"):
        es.build(module, backend="torch", backend_options=EAGER, import_options=options,
                 data={"x": np.zeros((2, 5, 16, 16), np.float32)})  # 5 channels: the inputs stage fails
    assert not children()

    def interrupt(stage: str, done: int, total) -> None:
        if stage.startswith("build"):
            assert children(), "the ONNX export should be running while the engine builds"
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        es.build(module, backend="torch", backend_options=EAGER, import_options=options, progress=interrupt)
    assert not children()
    assert set(Path(tempfile.gettempdir()).glob("enginesmith-onnx-*")) <= folders_before


class TypeTable(nn.Module):
    """An integer input indexing a small table: directly through an embedding (the torch program bounds it), or
    flattened first (only the ONNX graph, whose input plan looks through Reshape to the Gather, says how many rows)."""

    def __init__(self, flattened: bool) -> None:
        super().__init__()
        self.flattened = flattened
        self.types = nn.Embedding(2, 4)
        self.rows = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        if self.flattened:
            return x + self.rows.index_select(0, kind.reshape(-1)).reshape(x.shape)
        return x + self.types(kind)


@pytest.mark.parametrize("flattened", [False, True])
def test_generated_inputs_stay_inside_the_tables_integer_inputs_index(flattened: bool):
    torch.manual_seed(0)
    module = TypeTable(flattened).eval()
    example = {"x": torch.randn(2, 5, 4), "kind": torch.zeros(2, 5, dtype=torch.int64)}
    engine = es.build(module, backend="torch", backend_options=EAGER, import_options=ImportOptions(example_inputs=example))
    assert not children()
    record, samples = engine.manifest.checks["onnx_export"], engine.manifest.checks["samples"]
    rows = 3 if flattened else 2
    assert f"in [0, {rows})" in samples["label"]  # the generated inputs the build verified on
    if flattened:  # the program gives no bound: the plan waited for the ONNX graph's
        assert record["alongside_build"] is False and "hints" in record["joined_early"]
    else:
        assert record["alongside_build"] is True and "joined_early" not in record
    kind = np.array([[0, 1, 1, 0, 1]] * 3, np.int64)
    x = np.random.default_rng(4).standard_normal((3, 5, 4)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x), torch.from_numpy(kind)).numpy()
    np.testing.assert_allclose(engine(x=x, kind=kind)["output"], want, rtol=1e-6)


def test_the_build_time_line_shows_the_export_alongside_the_stages():
    from enginesmith.cli.engine_commands import stages_line

    stages = {"import": 2.0, "build": 20.0, "package": 0.5}
    line = stages_line(stages, {"alongside_build": True, "ok": True, "seconds": 14.0, "waited_s": 0.5})
    assert line.startswith("time: 22.5s (import 2.0s, build 20.0s, package 0.5s)")
    assert line.endswith("; ONNX export 14.0s alongside (package waited 0.5s)")
    failed = stages_line(stages, {"alongside_build": True, "ok": False, "seconds": 3.0, "waited_s": 0.0})
    assert "ONNX export 3.0s alongside, failed" in failed
    assert stages_line(stages, None) == "time: 22.5s (import 2.0s, build 20.0s, package 0.5s)"


def test_auto_runs_the_export_alongside_only_where_there_are_cores_for_it(monkeypatch):
    from enginesmith.pipeline import stages

    module = MeanHead().eval()
    options = ImportOptions(example_inputs=(torch.randn(2, 3, 16, 16),))
    auto = {"device": "cpu", "compile": "eager"}
    monkeypatch.setattr(stages, "usable_cores", lambda: 2)
    before = es.build(module, backend="torch", backend_options=auto, import_options=options)
    assert "onnx_export" not in before.manifest.checks  # converted in the import stage, as before
    assert "graph_passes" in before.manifest.checks and "compatibility" in before.manifest.checks
    monkeypatch.setattr(stages, "usable_cores", lambda: 16)
    alongside = es.build(module, backend="torch", backend_options=auto, import_options=options)
    assert alongside.manifest.checks["onnx_export"]["alongside_build"] is True
    assert alongside.manifest.signature == before.manifest.signature
    with pytest.raises(BuildError, match="onnx_export must be auto, alongside, before"):
        es.build(module, backend="torch", backend_options={**auto, "onnx_export": "later"}, import_options=options)
    assert not children()
