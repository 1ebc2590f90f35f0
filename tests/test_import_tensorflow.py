"""TensorFlow sources: SavedModel folders and frozen GraphDef .pb files, against TensorFlow's own outputs."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")

import enginesmith as es  # noqa: E402
from enginesmith.errors import SourceError  # noqa: E402
from enginesmith.importers import ImportOptions, detect_kind  # noqa: E402
from enginesmith.importers.tensorflow_importer import graph_io, list_graph_nodes, read_graph_def  # noqa: E402

pytestmark = pytest.mark.tensorflow
TOL = dict(rtol=1e-4, atol=1e-4)


def make_keras_model():
    keras.utils.set_random_seed(3)
    feat = keras.Input((6,), name="feat")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(feat)
    probs = keras.layers.Dense(3, activation="softmax", name="probs")(hidden)
    box = keras.layers.Dense(4, name="box")(hidden)
    return keras.Model(feat, [probs, box])


class Serving(tf.Module):
    """A SavedModel with two signatures: dict outputs by default, logits on request."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @tf.function(input_signature=[tf.TensorSpec((None, 6), tf.float32, name="feat")])
    def serve(self, feat):
        probs, box = self.model(feat)
        return {"probs": probs, "box": box}

    @tf.function(input_signature=[tf.TensorSpec((None, 6), tf.float32, name="feat")])
    def box_only(self, feat):
        return {"scaled_box": self.model(feat)[1] * 2.0}


def freeze(model) -> bytes:
    """A frozen GraphDef as TF2 code exports it (outputs named with tf.identity)."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    @tf.function(input_signature=[tf.TensorSpec((None, 6), tf.float32, name="feat")])
    def fn(feat):
        probs, box = model(feat)
        return {"probs": tf.identity(probs, name="probs"), "box": tf.identity(box, name="box")}

    frozen = convert_variables_to_constants_v2(fn.get_concrete_function())
    return frozen.graph.as_graph_def().SerializeToString()


def tf1_training_graph() -> bytes:
    """A TF1-era graph: inference path plus labels, loss, summary, assert and saver nodes."""
    rng = np.random.default_rng(5)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, (None, 6), name="x")
        labels = tf.compat.v1.placeholder(tf.float32, (None, 3), name="labels")
        weights = tf.constant(rng.standard_normal((6, 3)).astype("f4"), name="weights")
        bias = tf.constant(rng.standard_normal(3).astype("f4"), name="bias")
        logits = tf.nn.bias_add(tf.matmul(x, weights), bias, name="logits")
        tf.nn.softmax(logits, name="probs")
        with tf.name_scope("loss"):
            loss = tf.reduce_mean(tf.square(logits - labels), name="value")
        with tf.name_scope("summaries"):
            tf.compat.v1.summary.scalar("loss", loss)
        tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(logits)), [logits], name="check_finite").mark_used()
        with tf.name_scope("save"):
            tf.constant("model.ckpt", name="filename")
    return graph.as_graph_def().SerializeToString()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("tf")
    model = make_keras_model()
    serving = Serving(model)
    saved = root / "served"
    tf.saved_model.save(serving, str(saved), signatures={"serving_default": serving.serve, "box_only": serving.box_only})
    frozen = root / "frozen.pb"
    frozen.write_bytes(freeze(model))
    training = root / "tf1.pb"
    training.write_bytes(tf1_training_graph())
    return {"model": model, "saved": saved, "frozen": frozen, "training": training, "root": root}


def _feat(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 6)).astype("f4")


def test_saved_model_names_outputs_and_rebuild(sources, tmp_path: Path) -> None:
    assert detect_kind(sources["saved"]) == "savedmodel"
    engine = es.build(sources["saved"])
    assert engine.signature.input_names == ["feat"]
    assert sorted(engine.signature.output_names) == ["box", "probs"]
    assert engine.manifest.source_name == "served.dir.zip"
    assert engine.manifest.checks["build_verification"]["passed"]
    signature = tf.saved_model.load(str(sources["saved"])).signatures["serving_default"]
    for batch in (1, 5):
        x = _feat(batch, seed=batch)
        expected = {k: v.numpy() for k, v in signature(feat=tf.constant(x)).items()}
        out = engine(feat=x)
        for name in ("probs", "box"):
            np.testing.assert_allclose(out[name], expected[name], **TOL)
        np.testing.assert_allclose(out["probs"], sources["model"].predict(x, verbose=0)[0], **TOL)
    path = tmp_path / "served.engine"
    engine.save(path)
    rebuilt = es.build(path)  # unpacks the embedded folder
    np.testing.assert_allclose(rebuilt(feat=_feat(2))["box"], engine(feat=_feat(2))["box"], **TOL)
    assert es.validate(path).passed
    assert es.validate(path, against=sources["saved"]).passed


def test_saved_model_signature_choice(sources) -> None:
    engine = es.build(sources["saved"], import_options=ImportOptions(signature_key="box_only"))
    assert engine.signature.output_names == ["scaled_box"]
    x = _feat(3)
    np.testing.assert_allclose(engine(feat=x)["scaled_box"], sources["model"].predict(x, verbose=0)[1] * 2, **TOL)
    with pytest.raises(SourceError, match=r"no signature 'nope'.*box_only, serving_default"):
        es.build(sources["saved"], import_options=ImportOptions(signature_key="nope"))


def test_frozen_graph_without_names(sources, tmp_path: Path) -> None:
    graph_def = read_graph_def(sources["frozen"])
    inputs, outputs = graph_io(graph_def)
    assert inputs == ["feat"]
    assert sorted(outputs) == ["box", "probs"]  # looked through TF2's trailing Identity nodes
    engine = es.build(sources["frozen"])
    assert engine.manifest.source_kind == "tf_graph"
    assert engine.signature.input_names == ["feat"]
    assert sorted(engine.signature.output_names) == ["box", "probs"]
    for batch in (1, 5):
        x = _feat(batch, seed=10 + batch)
        probs, box = sources["model"].predict(x, verbose=0)
        out = engine(feat=x)
        np.testing.assert_allclose(out["probs"], probs, **TOL)
        np.testing.assert_allclose(out["box"], box, **TOL)
    path = tmp_path / "frozen.engine"
    engine.save(path)
    assert es.build(path).signature.input_names == ["feat"]
    assert es.validate(path, against=sources["frozen"]).passed


def test_frozen_graph_name_override(sources) -> None:
    engine = es.build(sources["frozen"], import_options=ImportOptions(output_names=["probs:0"]))
    assert engine.signature.output_names == ["probs"]
    with pytest.raises(SourceError, match="enginesmith inspect frozen.pb"):
        es.build(sources["frozen"], import_options=ImportOptions(output_names=["no_such_node"]))


def test_tf1_graph_skips_training_nodes(sources) -> None:
    graph_def = read_graph_def(sources["training"])
    assert graph_io(graph_def) == (["x"], ["probs"])
    rows = {row["name"]: row for row in list_graph_nodes(sources["training"])}
    assert rows["x"]["role"] == "input" and rows["probs"]["role"] == "output"
    assert rows["labels"]["role"] == "" and rows["probs"]["op"] == "Softmax"
    assert rows["logits"]["inputs"] == ["MatMul", "bias"]
    engine = es.build(sources["training"])
    assert engine.signature.input_names == ["x"]
    assert engine.signature.output_names == ["probs"]
    assert any("stripped" in line for line in engine.manifest.build_log)
    x = _feat(4)
    out = engine(x=x)["probs"]
    np.testing.assert_allclose(out.sum(axis=1), np.ones(4), rtol=1e-5)


def test_fixed_shape_for_frozen_graph(sources) -> None:
    engine = es.build(sources["training"], import_options=ImportOptions(input_shapes={"x": (2, 6)}))
    assert engine.signature.inputs[0].shape == (2, 6)


def test_bad_tensorflow_sources(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\xff\xff\xff not a graph")
    with pytest.raises(SourceError, match="not a TensorFlow GraphDef"):
        es.build(garbage)
    with pytest.raises(SourceError, match="not found"):
        es.build(tmp_path / "missing.pb")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(SourceError, match="not a TensorFlow SavedModel"):
        es.build(empty)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, (None, 2), name="x")
        w = tf.compat.v1.get_variable("w", (2, 2))
        tf.matmul(x, w, name="y")
    unfrozen = tmp_path / "unfrozen.pb"
    unfrozen.write_bytes(graph.as_graph_def().SerializeToString())
    with pytest.raises(SourceError, match="not frozen"):
        es.build(unfrozen)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"garbage")
    with pytest.raises(SourceError, match="not a loadable SavedModel"):
        es.build(broken)


def test_inspect_lists_frozen_graph_nodes(sources, capsys) -> None:
    import json

    from enginesmith.cli.app import main

    assert main(["inspect", str(sources["frozen"])]) == 0
    out = " ".join(capsys.readouterr().out.split())
    nodes = list_graph_nodes(sources["frozen"])
    assert f"TensorFlow nodes ({len(nodes)})" in out and "Placeholder" in out
    assert main(["inspect", str(sources["frozen"]), "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [n["name"] for n in data["tensorflow_nodes"]] == [n["name"] for n in nodes]
    assert data["model"]["outputs"] and data["model"]["layers"]  # the converted ONNX view is there too


def test_references_name_their_inputs_so_a_wrong_against_is_refused_before_running(sources, mlp_engine_path) -> None:
    from enginesmith.importers import reference_runner

    assert reference_runner(sources["saved"]).input_names == ["feat"]
    assert reference_runner(sources["frozen"]).input_names == ["feat"]
    # The engine takes 'x': comparing it with a model that takes 'feat' is refused, naming both.
    for other in (sources["saved"], sources["frozen"]):
        with pytest.raises(es.ValidationDataError, match=r"the engine's inputs \(x\) and the reference's inputs \(feat\) do not match"):
            es.validate(mlp_engine_path, other)


class _Dense(tf.Module):
    def __init__(self):
        super().__init__()
        self.w = tf.Variable(np.arange(8, dtype=np.float32).reshape(4, 2) / 8)
        # An optimizer-like object with a slot for w: TF2 revives it as a plain object and cannot add the slot.
        self.opt = tf.Module()
        self.opt.m = tf.Variable(np.zeros((4, 2), np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def serve(self, x):
        return {"y": tf.nn.relu(tf.matmul(x, self.w))}


def test_saved_model_tf2_cannot_revive_is_read_with_the_tf1_loader(tmp_path: Path) -> None:
    # Basic Pitch's SavedModel: an old Keras optimizer's slot variables make tf.saved_model.load fail
    # with "'_UserObject' object has no attribute 'add_slot'"; its signature graph is still whole.
    from tensorflow.core.protobuf import saved_model_pb2

    module, folder = _Dense(), tmp_path / "slotted"
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((folder / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].object_graph_def
    ids = {child.local_name: child.node_id for node in graph.nodes for child in node.children}
    slot = graph.nodes[ids["opt"]].slot_variables.add()
    slot.original_variable_node_id, slot.slot_name, slot.slot_variable_node_id = ids["w"], "m", ids["m"]
    (folder / "saved_model.pb").write_bytes(saved.SerializeToString())
    with pytest.raises(AttributeError, match="add_slot"):
        tf.saved_model.load(str(folder))

    engine = es.build(folder, backend="onnxruntime")
    assert engine.manifest.checks["build_verification"]["passed"]
    assert any("through the TF1 loader" in line for line in engine.manifest.build_log)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(engine(x=x)["y"], np.maximum(x @ module.w.numpy(), 0), rtol=1e-5, atol=1e-6)
