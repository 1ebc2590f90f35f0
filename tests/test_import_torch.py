"""PyTorch sources: nn.Module / ExportedProgram objects, .pt2 and TorchScript files, against torch's own outputs."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

import enginesmith as es  # noqa: E402
from enginesmith.errors import SourceError  # noqa: E402
from enginesmith.importers import ImportOptions, detect_kind  # noqa: E402

pytestmark = pytest.mark.torch
TOL = dict(rtol=1e-4, atol=1e-4)


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.left_fc = torch.nn.Linear(4, 8)
        self.right_fc = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, left, right):
        joined = torch.cat([torch.relu(self.left_fc(left)), torch.relu(self.right_fc(right))], dim=1)
        return {"score": self.head(joined), "mean": joined.mean(dim=1, keepdim=True)}


class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.pool = torch.nn.MaxPool2d(2)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(4 * 4 * 4, 5)

    def forward(self, image):
        x = self.pool(torch.relu(self.bn(self.conv(image))))
        return torch.softmax(self.fc(self.drop(x).flatten(1)), dim=1)


class DataDependent(torch.nn.Module):
    """A Python branch on tensor values: torch.export refuses it, the tracer follows it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        if torch.relu(x).sum() >= 0:  # always true, but data-dependent
            return self.fc(x)
        return -self.fc(x)


def _seeded(cls):
    torch.manual_seed(0)
    model = cls().eval()
    if isinstance(model, Classifier):
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.2, 0.2)
            model.bn.running_var.uniform_(0.5, 2.0)
    return model


def _run(model, *arrays):
    with torch.no_grad():
        return model(*[torch.from_numpy(a) for a in arrays])


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype("f4")


@pytest.fixture(scope="module")
def two():
    return _seeded(TwoInputs)


@pytest.fixture(scope="module")
def pt2_path(tmp_path_factory, two):
    path = tmp_path_factory.mktemp("torch") / "two.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(two, (torch.randn(2, 4), torch.randn(2, 4)),
                                  dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, str(path))
    return path


def test_module_two_inputs_dynamic_batch_and_rebuild(two, tmp_path: Path) -> None:
    options = ImportOptions(example_inputs=(torch.randn(1, 4), torch.randn(1, 4)))
    engine = es.build(two, import_options=options)
    assert engine.signature.input_names == ["left", "right"]
    assert engine.signature.output_names == ["score", "mean"]
    assert engine.signature.inputs[0].shape == ("batch", 4)
    assert engine.manifest.source_name == "TwoInputs.pt2"
    assert engine.manifest.checks["build_verification"]["passed"]
    assert any("dynamo=True" in line for line in engine.manifest.build_log)
    for batch in (1, 5):
        left, right = _rand(batch, 4, seed=batch), _rand(batch, 4, seed=10 + batch)
        out = engine(left=left, right=right)
        expected = _run(two, left, right)
        for name in ("score", "mean"):
            np.testing.assert_allclose(out[name], expected[name].numpy(), **TOL)
    path = tmp_path / "two.engine"
    engine.save(path)
    rebuilt = es.build(path)  # from the embedded ExportedProgram, no --trust-code needed
    left, right = _rand(3, 4, seed=3), _rand(3, 4, seed=4)
    np.testing.assert_allclose(rebuilt(left=left, right=right)["score"], _run(two, left, right)["score"].numpy(), **TOL)
    assert es.validate(path).passed


def test_classifier_from_input_spec_is_fixed(tmp_path: Path) -> None:
    model = _seeded(Classifier).train()  # built in eval mode; the caller's mode is left as it was
    engine = es.build(model, import_options=ImportOptions(input_shapes={"image": (2, 3, 8, 8)}))
    assert model.training
    model.eval()
    assert engine.signature.inputs[0].shape == (2, 3, 8, 8)
    assert engine.signature.output_names == ["output"]
    image = _rand(2, 3, 8, 8)
    np.testing.assert_allclose(engine(image=image)["output"], _run(model, image).numpy(), **TOL)
    named = es.build(model, import_options=ImportOptions(input_shapes={"image": (1, 3, 8, 8)}, dynamic_axes={"image": [0]},
                                                         output_names=["probs"]))
    assert named.signature.inputs[0].shape == ("batch", 3, 8, 8)
    assert named.signature.output_names == ["probs"]
    image = _rand(4, 3, 8, 8, seed=2)
    np.testing.assert_allclose(named(image=image)["probs"], _run(model, image).numpy(), **TOL)


def test_pt2_file_and_validate_against_it(two, pt2_path: Path, tmp_path: Path) -> None:
    assert detect_kind(pt2_path) == "torch"
    engine = es.build(pt2_path)
    assert engine.signature.input_names == ["left", "right"]
    assert engine.signature.output_names == ["score", "mean"]
    for batch in (1, 5):
        left, right = _rand(batch, 4, seed=batch), _rand(batch, 4, seed=20 + batch)
        np.testing.assert_allclose(engine(left=left, right=right)["mean"], _run(two, left, right)["mean"].numpy(), **TOL)
    path = tmp_path / "pt2.engine"
    engine.save(path)
    assert es.validate(path, against=pt2_path).passed


def test_exported_program_object(two) -> None:
    program = torch.export.export(two, (torch.randn(3, 4), torch.randn(3, 4)))
    engine = es.build(program)
    assert engine.signature.inputs[0].shape == (3, 4)  # exported without dynamic dims: fixed
    left, right = _rand(3, 4), _rand(3, 4, seed=1)
    np.testing.assert_allclose(engine(left=left, right=right)["score"], _run(two, left, right)["score"].numpy(), **TOL)


def test_pickled_pt2_is_refused(pt2_path: Path, tmp_path: Path) -> None:
    """A .pt2 whose weights are flagged as pickles would run code in torch.export.load."""
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(pt2_path) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"]))
                config["config"][first]["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(info, data)
    with pytest.raises(SourceError, match=r"pickle.*--trust-code"):
        es.build(tampered)


def test_torchscript_needs_trust_code(tmp_path: Path) -> None:
    model = _seeded(Classifier)
    path = tmp_path / "classifier.pt"
    torch.jit.script(model).save(str(path))
    with pytest.raises(SourceError, match="--trust-code"):
        es.build(path)
    options = ImportOptions(trust_code=True, input_shapes={"image": (1, 3, 8, 8)}, dynamic_axes={"image": [0]})
    engine = es.build(path, import_options=options)
    assert engine.manifest.source_kind == "torchscript"
    assert engine.signature.inputs[0].shape == ("batch", 3, 8, 8)
    image = _rand(5, 3, 8, 8)
    np.testing.assert_allclose(engine(image=image)["output"], _run(model, image).numpy(), **TOL)


def test_fallback_when_torch_export_fails(tmp_path: Path) -> None:
    model = _seeded(DataDependent)
    engine = es.build(model, import_options=ImportOptions(example_inputs=torch.randn(2, 4)))
    assert any("falling back" in line for line in engine.manifest.build_log)
    assert engine.manifest.source_name == "DataDependent.onnx"
    x = _rand(5, 4)
    np.testing.assert_allclose(engine(x=x)["output"], _run(model, x).numpy(), **TOL)
    path = tmp_path / "fallback.engine"
    engine.save(path)
    assert es.build(path).signature.input_names == ["x"]


def test_user_errors(two, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="needs example inputs"):
        es.build(two)
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(SourceError, match="not a torch.export .pt2 archive"):
        es.build(garbage)
    with pytest.raises(SourceError, match="not found"):
        es.build(tmp_path / "missing.pt2")
    state = tmp_path / "weights.pt"
    torch.save(two.state_dict(), str(state))
    with pytest.raises(SourceError, match="not a TorchScript archive"):
        es.build(state, import_options=ImportOptions(trust_code=True, input_shapes={"left": (1, 4)}))


def test_references_name_their_inputs_so_a_wrong_against_is_refused_before_running(two, pt2_path: Path,
                                                                                    mlp_engine_path: Path) -> None:
    from enginesmith.importers import reference_runner

    assert reference_runner(two).input_names == ["left", "right"]
    assert reference_runner(pt2_path).input_names == ["left", "right"]
    with pytest.raises(es.ValidationDataError, match=r"the engine's inputs \(x\) and the reference's inputs \(left, right\)"):
        es.validate(mlp_engine_path, pt2_path)


def test_when_both_onnx_exporters_fail_the_dynamo_failure_is_named_first(monkeypatch) -> None:
    """The H200 run reported only the TorchScript fallback's 'BertModel.forward() got multiple values for argument
    use_cache' (that exporter cannot trace transformers' BERT at all), hiding why the dynamo exporter failed."""
    transformers = pytest.importorskip("transformers")
    from enginesmith.errors import UnsupportedModelError
    from enginesmith.importers import import_model, torch_to_onnx

    def failing(*args, **kwargs):
        raise RuntimeError("dynamo could not lower aten.frobnicate")

    monkeypatch.setattr(torch_to_onnx, "dynamo_onnx", failing)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=32)
    module = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    with pytest.raises(UnsupportedModelError,
                       match=r"dynamo exporter failed \(dynamo could not lower aten.frobnicate\), then the TorchScript"):
        import_model(module, ImportOptions(example_inputs=example))
