"""The model zoo's "test" tier: real pretrained models from PyPI packages through the CLI.

The models (benchmarks/zoo/models.toml, tier "test", a few MB) are downloaded once into the
zoo cache (ENGINESMITH_ZOO_CACHE, default ~/.cache/enginesmith-zoo) and reused. The tests are
skipped only when pip cannot download the first package (the registry is unreachable).
"""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ZOO_SCRIPT = Path(__file__).parents[1] / "benchmarks" / "zoo.py"


def _load_zoo():
    spec = importlib.util.spec_from_file_location("enginesmith_zoo", ZOO_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


zoo = _load_zoo()
corpus = sys.modules["zoo_corpus"]  # imported by zoo.py from its own folder
TEST_TIER = [m for m in corpus.load_manifest() if m.tier == "test"]


@pytest.fixture(scope="module")
def zoo_cache() -> Path:
    """The cache, with the first test-tier package in it; skips when the registry is unreachable."""
    first = TEST_TIER[0]
    try:
        corpus.download_wheel(first.package, first.version, corpus.DEFAULT_CACHE)
    except corpus.RegistryError as exc:
        pytest.skip(f"package registry unreachable, the zoo cannot be downloaded: {exc}")
    return corpus.DEFAULT_CACHE


def test_manifest_is_complete() -> None:
    models = corpus.load_manifest()
    assert len(models) >= 25
    for model in models:
        assert len(model.sha256) == 64 and model.license and model.task and model.tier in ("test", "bench")
        assert model.inputs, f"{model.id}: no sample inputs"
    assert 0 < len(TEST_TIER) < 6


@pytest.mark.slow
@pytest.mark.parametrize("model", TEST_TIER, ids=[m.id for m in TEST_TIER])
def test_zoo_model_builds_validates_and_runs(model, zoo_cache: Path, tmp_path: Path) -> None:
    result, source, engine = zoo.check_model(model, zoo_cache, tmp_path)
    assert source is not None and corpus.sha256_of(source) == model.sha256, result.problems
    assert result.tracebacks == [], f"tracebacks in {result.tracebacks}: {result.problems}"
    default_build = result.steps[0]
    assert default_build["command"].startswith("enginesmith build") and "--" not in default_build["command"].split(" -o ")[0]
    if engine is None:  # refused: it must say why in one line
        assert result.status == "clear error", result.problems
        assert default_build["clear_error"], default_build["stderr_tail"]
        return
    assert result.status.startswith("built"), result.status
    assert engine.is_file()
    later = [s for s in result.steps if s["name"] in ("validate", "run")]
    assert [s["name"] for s in later] == ["validate", "run"]
    for step in later:  # each works, or says in one line why not
        assert step["returncode"] == 0 or step["clear_error"] or (step["name"] == "validate" and step["returncode"] == 1), step
    if result.status == "built by default":  # nothing special about it: the engine must match its source
        assert result.validate == "PASS", result.steps
        assert result.run == "ok", result.steps


# --------------------------------------------------------------------------- the script's own safety


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_extract_refuses_path_escapes(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "evil.whl", {"pkg/models/../../../../escaped.onnx": b"x", "pkg/saved/../../../up/a.pb": b"y"})
    with pytest.raises(ValueError, match="unsafe path"):
        corpus.extract_model(wheel, "pkg/saved/", tmp_path / "out")
    assert not (tmp_path / "up").exists() and not list((tmp_path / "out").rglob("*.pb"))


def test_npm_tarball_links_are_skipped_and_escapes_refused(tmp_path: Path) -> None:
    import io
    import tarfile

    tgz = tmp_path / "pkg-1.0.0.tgz"
    with tarfile.open(tgz, "w:gz") as archive:
        for name, data in {"package/m.tflite": b"tflite", "package/../../escaped.onnx": b"x"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("package/passwd.onnx")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    assert corpus.extract_model(tgz, "package/m.tflite", tmp_path / "a").read_bytes() == b"tflite"
    with pytest.raises(FileNotFoundError):  # a link is not a regular file: never extracted
        corpus.extract_model(tgz, "package/passwd.onnx", tmp_path / "b")
    with pytest.raises(ValueError, match="unsafe path"):
        corpus.extract_model(tgz, "package/", tmp_path / "c")
    assert not (tmp_path / "escaped.onnx").exists()


def test_extract_file_and_folder_and_folder_hash(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "ok.whl", {"pkg/m.onnx": b"model", "pkg/sm/saved_model.pb": b"graph",
                                         "pkg/sm/variables/v.index": b"index"})
    file = corpus.extract_model(wheel, "pkg/m.onnx", tmp_path / "a")
    assert file.read_bytes() == b"model" and corpus.sha256_of(file) == corpus.hashlib.sha256(b"model").hexdigest()
    folder = corpus.extract_model(wheel, "pkg/sm/", tmp_path / "b")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "saved_model.pb", "variables/v.index"]
    before = corpus.sha256_of(folder)
    (folder / "variables" / "v.index").write_bytes(b"changed")
    assert corpus.sha256_of(folder) != before
    with pytest.raises(FileNotFoundError, match="not in ok.whl"):
        corpus.extract_model(wheel, "pkg/missing.onnx", tmp_path / "c")


def test_fetch_refuses_a_file_whose_checksum_differs(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "wheels" / "pkg-1.0").mkdir(parents=True)
    _wheel(cache / "wheels" / "pkg-1.0" / "pkg-1.0-py3-none-any.whl", {"pkg/m.onnx": b"tampered"})
    model = corpus.ZooModel("m", "pkg", "1.0", "pkg/m.onnx", corpus.hashlib.sha256(b"original").hexdigest(), "MIT", "t", "test")
    with pytest.raises(ValueError, match="sha256 of pkg/m.onnx"):
        corpus.fetch_model(model, cache)


def test_suggested_flags_come_from_the_error_line(tmp_path: Path) -> None:
    stderr = ("2026 [W:onnxruntime] noise --input bogus:1\n"
              "error: input 'x' has symbolic dimensions ['h', 'w']: fix them with --input x:1x3x320x320 "
              "or pass sample inputs with --data FILE.npz\n")
    step = zoo.Step("build", ["build", "m.onnx"], 2, 1.0, "", stderr)
    assert step.clear_error and not step.traceback
    sample = tmp_path / "s.npz"
    assert zoo.suggested_flags(step, sample) == ["--input", "x:1x3x320x320", "--data", str(sample)]
    assert zoo.suggested_flags(step, None) == ["--input", "x:1x3x320x320"]
    refused = zoo.Step("build", ["build", "q.tflite"], 2, 1.0, "", "error: the built fp32 engine does not match the "
                       "source model (...); pass verify=False / --no-verify to keep it anyway\n")
    assert zoo.suggested_flags(refused, sample) == ["--no-verify"]
    # A template with '?' (a size the user must choose) is not cut down to a wrong flag like --input input:1.
    template = zoo.Step("build", ["build", "vad.onnx"], 2, 1.0, "", "error: ... fix the shapes with --input input:1x? "
                        "(a size the model takes for each ?) or give real inputs with --data FILE\n")
    assert zoo.suggested_flags(template, sample) == ["--data", str(sample)]
    failed = zoo.Step("validate", ["validate", "m.engine"], 1, 1.0, "table\nFAIL (fp32 tolerance: {...})\n", "INFO: noise\n")
    assert failed.failure_text() == "FAIL (fp32 tolerance: {...})" and not failed.clear_error
    crashed = zoo.Step("build", ["build", "m.onnx"], 1, 1.0, "",
                       "Traceback (most recent call last):\n  File \"x.py\"\nValueError: boom\n")
    assert crashed.traceback and not crashed.clear_error and crashed.failure_text() == "ValueError: boom"


def test_samples_follow_the_manifest() -> None:
    silero = next(m for m in corpus.load_manifest() if m.id == "silero_vad")
    sample = silero.sample()
    assert sample["sr"].dtype == np.int64 and sample["sr"].shape == () and int(sample["sr"]) == 16000
    assert sample["state"].shape == (2, 1, 128) and not sample["state"].any()
    assert sample["input"].dtype == np.float32 and sample["input"].shape == (1, 512)
