"""The manifest: the typed record at the heart of every engine bundle.

It says what the engine is (backend, precision, signature), where it came from
(source kind and checksum, build options), where it may run (the platform
fingerprint) and what was checked (validation summaries). The manifest carries
its own checksum so an edited manifest is detected, not trusted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import BundleError
from .signature import Signature

FORMAT_VERSION = 1


@dataclass
class FileRecord:
    sha256: str
    size: int


@dataclass
class Manifest:
    enginesmith_version: str
    backend: str
    backend_version: str
    precision: str
    signature: Signature
    source_kind: str
    source_name: str
    source_sha256: str
    build_options: dict[str, Any]
    payload_name: str
    fingerprint: dict[str, str]
    # Keys of ``fingerprint`` that must equal this machine's for the engine to run.
    fingerprint_must_match: list[str]
    created_at: str
    files: dict[str, FileRecord] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    build_log: list[str] = field(default_factory=list)
    # How images become inputs (a PreprocessSpec as a dict), when the engine was calibrated on images.
    preprocess: dict[str, Any] | None = None
    # The accuracy rule the precision was chosen under, e.g. {"metric": "agreement", "min": 0.99}.
    accuracy_budget: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    @property
    def payload_entry(self) -> str:
        return "payload/" + self.payload_name

    @property
    def source_entry(self) -> str:
        return "source/" + self.source_name

    @property
    def payload_sha256(self) -> str | None:
        record = self.files.get(self.payload_entry)
        return record.sha256 if record else None

    @property
    def has_source(self) -> bool:
        return self.source_entry in self.files

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["signature"] = self.signature.to_dict()
        data["payload_sha256"] = self.payload_sha256
        return data

    def to_json(self) -> bytes:
        body = self.to_dict()
        body["manifest_sha256"] = _canonical_sha256(body)
        return json.dumps(body, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Manifest":
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"bundle manifest is not valid JSON ({exc}): the bundle is corrupted; rebuild it") from None
        if not isinstance(data, dict):
            raise BundleError("bundle manifest is not a JSON object: the bundle is corrupted; rebuild it")
        stated = data.pop("manifest_sha256", None)
        if stated != _canonical_sha256(data):
            raise BundleError(
                "bundle manifest checksum does not match its content: the manifest was edited or "
                "corrupted; rebuild the engine"
            )
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version} is not supported by this enginesmith "
                f"(supports {FORMAT_VERSION}); rebuild the engine or upgrade enginesmith"
            )
        data.pop("payload_sha256", None)
        try:
            data["signature"] = Signature.from_dict(data["signature"])
            data["files"] = {name: FileRecord(**rec) for name, rec in data["files"].items()}
            return cls(**data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"bundle manifest is missing or has malformed fields ({exc}); rebuild the engine") from None


def _canonical_sha256(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ONNX Runtime providers that put an engine on a GPU.
ORT_GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})


def engine_needs_gpu(manifest: Manifest) -> bool:
    """Whether the engine runs on an NVIDIA GPU (what schedulers must give it: Kubernetes, Ray)."""
    options = manifest.build_options.get("backend_options") or {}
    if manifest.backend == "tensorrt":
        return True
    if manifest.backend == "onnxruntime":
        return bool(ORT_GPU_PROVIDERS & set(options.get("providers") or []))
    return str(manifest.fingerprint.get("device", "")).startswith("cuda")
