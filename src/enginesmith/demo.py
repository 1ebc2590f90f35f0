"""The train-to-deploy story in one command, on the CPU, with no downloads.

1. train a small Keras CNN (Conv/BatchNorm/ReLU/Pool/Dropout/Dense) on scikit-learn's
   digits data, which ships inside scikit-learn;
2. save it as ``digits.keras``;
3. build an enginesmith engine from the file (no output names given: they are found);
4. validate the engine against Keras itself and compare test-split accuracy;
5. benchmark the engine against Keras ``predict`` and a ``tf.function`` call, same run;
6. write ``demo.json`` and ``demo.png`` into the output folder.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import MissingDependencyError

DEFAULT_OUTPUT = Path("enginesmith-demo")


@dataclass
class DemoResult:
    output_dir: str
    keras_path: str
    engine_path: str
    train_seconds: float
    build_seconds: float
    keras_test_accuracy: float
    engine_test_accuracy: float
    prediction_agreement: float
    validation: dict[str, Any]
    benchmark: dict[str, Any]
    steps: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()


DEMO_EXTRA = "pip install 'enginesmith[tensorflow,demo]'"


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Keep TensorFlow's C++ start-up lines (the oneDNN notice, absl's pre-init warning) off the terminal.

    They are written to file descriptor 2 while TensorFlow loads, before any Python logging setting
    applies. oneDNN itself stays on: the benchmark baseline runs TensorFlow as users do.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _require_frameworks():
    # scikit-learn first: a missing one is reported before TensorFlow is imported.
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise MissingDependencyError(
            f"the demo needs TensorFlow, Keras and scikit-learn (scikit-learn is missing): {DEMO_EXTRA}"
        ) from None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        with _native_stderr_silenced():
            import keras
            import tensorflow as tf
    except ImportError as exc:
        raise MissingDependencyError(
            f"the demo needs TensorFlow, Keras and scikit-learn ({exc.name} is missing): {DEMO_EXTRA}"
        ) from None
    return keras, tf, load_digits, train_test_split


def digits_split(seed: int = 0):
    """Digits images as NHWC float32 in [0, 1], split 80/20 with a fixed seed."""
    _, _, load_digits, train_test_split = _require_frameworks()
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    return train_test_split(images, digits.target.astype(np.int64), test_size=0.2, random_state=seed,
                            stratify=digits.target)


def make_digits_cnn(keras):
    """A small CNN with the layers deployment tools stumble on: BatchNorm and Dropout.

    BatchNorm momentum 0.9 (Keras default 0.99): with ~20 steps an epoch the moving statistics
    would otherwise still lag the trained weights after a short training.
    """
    inputs = keras.Input(shape=(8, 8, 1), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv2")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(0.3, name="dropout")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


# What the demo writes into its folder; a folder whose demo.json came from the demo may be rewritten.
DEMO_FILES = ("digits.keras", "digits.engine", "test_images.npz", "demo.json", "demo.png")


def is_demo_folder(folder: Path) -> bool:
    """Whether ``folder/demo.json`` is a report an earlier demo wrote (so its files are the demo's own)."""
    try:
        report = json.loads((folder / "demo.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and "keras_test_accuracy" in report


def run_demo(
    output_dir: str | Path = DEFAULT_OUTPUT,
    epochs: int = 30,
    bench_runs: int = 50,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> DemoResult:
    import enginesmith as es
    from .bench import machine_facts, measure, plot_results
    from .files import write_atomic

    keras, tf, _, _ = _require_frameworks()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    x_train, x_test, y_train, y_test = digits_split(seed)
    steps: list[str] = []

    log(f"1/5 training a Keras CNN on {len(x_train)} digits images ({epochs} epochs) ...")
    model = make_digits_cnn(keras)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0, validation_split=0.1)
    train_seconds = time.perf_counter() - start
    keras_path = out / "digits.keras"
    model.save(keras_path)
    steps.append(f"trained {model.count_params()} parameters in {train_seconds:.1f} s, saved {keras_path}")

    log("2/5 building an engine from digits.keras (inputs and outputs found automatically) ...")
    start = time.perf_counter()
    engine_path = out / "digits.engine"
    es.build(keras_path, output=engine_path)
    build_seconds = time.perf_counter() - start
    engine = es.load(engine_path)
    steps.append(f"built {engine_path} in {build_seconds:.1f} s: {engine.signature.input_names} -> {engine.signature.output_names}")

    log("3/5 validating the engine against Keras on the test split ...")
    data_path = out / "test_images.npz"
    np.savez(data_path, **{engine.signature.input_names[0]: x_test})
    report = es.validate(engine, keras_path, data=data_path, batch=64)
    steps.append(report.summary())

    log("4/5 comparing test-split accuracy ...")
    input_name = engine.signature.input_names[0]
    output_name = engine.signature.output_names[0]
    keras_probs = model.predict(x_test, verbose=0)
    engine_probs = engine(**{input_name: x_test})[output_name]
    keras_acc = float(np.mean(keras_probs.argmax(-1) == y_test))
    engine_acc = float(np.mean(engine_probs.argmax(-1) == y_test))
    agreement = float(np.mean(keras_probs.argmax(-1) == engine_probs.argmax(-1)))
    steps.append(f"test accuracy: Keras {keras_acc:.2%}, engine {engine_acc:.2%}, same prediction on {agreement:.2%}")

    log("5/5 benchmarking engine vs Keras predict vs tf.function (same run, interleaved) ...")
    serve = tf.function(lambda x: model(x, training=False))
    targets = {
        "engine": lambda feeds: engine(feeds),
        "keras predict": lambda feeds: model.predict(feeds[input_name], verbose=0),
        "tf.function": lambda feeds: serve(tf.constant(feeds[input_name])),
    }
    results = []
    for batch in (1, 64):
        feeds = {input_name: x_test[:batch]}
        results += measure(targets, feeds, batch, warmup=3, runs=bench_runs, rounds=5)
    by_key = {(r.label, r.batch): r for r in results}
    ratios = {
        f"batch {b}": {label: by_key[(label, b)].p50_ms / by_key[("engine", b)].p50_ms for label in targets}
        for b in (1, 64)
    }
    benchmark = {
        "machine": machine_facts(),
        "results": [asdict(r) for r in results],
        "p50_relative_to_engine": ratios,
    }
    plot_results(results, out / "demo.png", "digits CNN: enginesmith engine vs Keras (CPU)")
    result = DemoResult(
        output_dir=str(out),
        keras_path=str(keras_path),
        engine_path=str(engine_path),
        train_seconds=train_seconds,
        build_seconds=build_seconds,
        keras_test_accuracy=keras_acc,
        engine_test_accuracy=engine_acc,
        prediction_agreement=agreement,
        validation=report.to_dict(),
        benchmark=benchmark,
        steps=steps,
    )
    write_atomic(out / "demo.json", result.to_json())
    return result
