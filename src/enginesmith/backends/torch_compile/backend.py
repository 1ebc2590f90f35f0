"""The PyTorch Inductor backend: resolves options, builds (convert, export, compile) and loads."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from ...errors import BuildError, UnsupportedModelError
from ...host import host_fingerprint
from ...native_source import NativeSource
from ...signature import Signature
from ..base import Availability, Backend, BuildOptions, BuildResult, Calibration, ProgressCallback, Session, node_names
from . import native_kernels
from .common import (CACHES_ENV, EXTRA_HINT, PAYLOAD_FORMAT, PAYLOAD_NAME, TORCH_PRECISIONS, _cxx_compiler,
                     _nvidia_present, _torch, _torch_dtype, _triton_version, device_facts, example_inputs,
                     resolve_device)
from .compile import (_aoti_compile, _aoti_load, _benchmark_limit, _cache_tag, _fresh_artifacts, _fused_module,
                      _GraphedRunner, _set_cudnn_benchmark, _set_fp32_math, _warm, captured_graphs, compile_module,
                      needs_rewrite)
from .cudnn_search import settle_cudnn_search, wanted_search
from .export import (_has_conv2d, _wrapper_class, allow_size_one, cpu_copies, export_program, served_ranges,
                     served_shapes, shape_text, specialized_dims)
from .mha import has_packable_attention, pack_self_attention
from .native import retarget_program, source_module, usable_source
from .onnx_convert import onnx_to_torch, op_status, retarget_casts
from .payload import _load_program, _save_program, pack_payload, read_native, unpack_payload
from .session import TorchSession

def _compile_failure(exc: BaseException) -> str:
    """The telling line of a torch.compile error (the last one is often a link to the graph-break docs)."""
    hints = ("For more details", "Set TORCHDYNAMO", "Set TORCH_LOGS", "Developer debug context", "Explanation:", "Hint:")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.strip().startswith(hints)]
    return (lines[-1] if lines else type(exc).__name__)[:300]


# The session compiled by the last build, handed to the load() that api.build does right after.
_HANDOFF: dict[str, TorchSession] = {}


class TorchCompileBackend(Backend):
    name = "torch"
    display_name = "PyTorch Inductor"

    @property
    def auto_priority(self) -> int:  # type: ignore[override]
        """Above ONNX Runtime (10) with a CUDA GPU, below it on CPU-only machines."""
        if not _nvidia_present() or importlib.util.find_spec("torch") is None:
            return 5
        try:
            return 15 if _torch().cuda.is_available() else 5
        except Exception:  # noqa: BLE001
            return 5

    def available(self) -> Availability:
        if importlib.util.find_spec("torch") is None:
            return Availability(False, f"PyTorch is not installed: {EXTRA_HINT}")
        try:
            _torch()
        except Exception as exc:  # noqa: BLE001 - a broken torch install is "not available"
            return Availability(False, f"PyTorch cannot be imported: {str(exc).splitlines()[0]}")
        return Availability(True)

    def version(self) -> str:
        return str(_torch().__version__)

    def fingerprint(self, options: BuildOptions) -> dict[str, str]:
        requested = str(options.backend_options.get("device", "auto"))
        torch = _torch()
        if requested == "auto":
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        else:
            device = requested if requested != "gpu" else "cuda:0"
        return {**host_fingerprint(), "backend_version": self.version(), **device_facts(device)}

    def must_match(self) -> list[str]:
        return ["os", "arch", "device", "gpu", "compute_capability", "backend_version", "triton_version", "cuda"]

    def payload_runs_code(self, options: BuildOptions) -> str | None:
        compile_mode = options.backend_options.get("compile", "inductor")
        if compile_mode == "aoti":
            return "its AOTInductor package is a native shared library"
        if compile_mode != "eager" and os.environ.get(CACHES_ENV, "1") != "0":
            return (f"its Inductor compiler cache holds pickled compiled graphs and kernels; set {CACHES_ENV}=0 "
                    "to ignore the cache and compile again on load instead (minutes with max-autotune)")
        return None

    def describe_platform(self, fingerprint: Mapping[str, str]) -> str:
        version = fingerprint.get("backend_version", "?")
        if fingerprint.get("device") == "cuda":
            return (f"{fingerprint.get('gpu', '?')} (compute {fingerprint.get('compute_capability', '?')}) / "
                    f"PyTorch Inductor {version}, CUDA {fingerprint.get('cuda', '?')}, Triton {fingerprint.get('triton_version', '?')}")
        return f"{fingerprint.get('arch', '?')} CPU / PyTorch Inductor {version}"

    def precisions(self, options: BuildOptions) -> list[str]:
        device = resolve_device(options.backend_options.get("device"))
        if not device.startswith("cuda"):
            return ["fp32"]
        torch = _torch()
        bf16 = torch.cuda.is_bf16_supported()
        return ["fp32", "bf16", "fp16"] if bf16 else ["fp32", "fp16"]

    def op_support(self, model: onnx.ModelProto, options: BuildOptions) -> dict[str, tuple[str, str]]:
        initializers = {tensor.name for tensor in model.graph.initializer}
        inputs = [value.name for value in model.graph.input if value.name not in initializers]
        outputs = [value.name for value in model.graph.output]
        if usable_source(options.native_source, inputs, outputs, str(options.backend_options.get("source", "auto")), []):
            # Built from the torch source itself: the ONNX conversion's ops do not matter.
            return {label: ("supported", "") for label in node_names(model)}
        status = op_status(model)
        return {label: status[i] for i, label in enumerate(node_names(model))}

    # ---------------------------------------------------------------- build

    def _resolve(self, options: BuildOptions, signature: Signature, module, log: list[str]) -> dict[str, Any]:
        bo = dict(options.backend_options)
        device = resolve_device(bo.get("device"))
        cuda = device.startswith("cuda")
        precision = options.precision
        if precision == "int8":
            raise UnsupportedModelError("the PyTorch Inductor backend builds fp32, fp16 and bf16 engines; "
                                        "for int8 use --backend onnxruntime")
        if precision not in TORCH_PRECISIONS:
            raise BuildError(f"unknown precision '{precision}' for the PyTorch backend: use fp32, fp16 or bf16")
        if precision != "fp32" and not cuda and not options.force_precision:
            log.append(f"{precision} does not pay on the CPU (Inductor's CPU kernels are fastest in fp32), so the "
                       "engine stays fp32; pass --force-precision to build it anyway")
            precision = "fp32"
        kind = str(bo.get("compile", "inductor")).lower()
        if kind not in ("inductor", "eager", "aoti"):
            raise BuildError(f"unknown compile '{kind}' for the PyTorch backend: use inductor, eager or aoti")
        if kind != "eager" and not cuda and _cxx_compiler() is None:
            log.append("no C++ compiler found: Inductor cannot generate CPU code here, so the engine runs the "
                       "exported program uncompiled (compile=eager)")
            kind = "eager"
        mode = str(bo.get("mode") or ("max-autotune" if cuda else "default"))
        fixed = signature.fixed_batch()
        dynamic_batch = fixed is None and any(s.rank and not isinstance(s.shape[0], int) for s in signature.inputs)
        if cuda:
            batches = [int(b) for b in bo.get("batches") or [fixed or 1]]
            if fixed is not None and batches != [fixed]:
                log.append(f"the model's batch is fixed at {fixed}: compiling that batch only")
                batches = [fixed]
            dynamic, warm = False, batches
        else:
            batches = []
            dynamic = dynamic_batch
            warm = [fixed] if fixed else ([2, 1] if dynamic_batch else [1])
        channels_last = bo.get("channels_last", "auto")
        if channels_last == "auto":
            channels_last = cuda and _has_conv2d(module) and any(s.rank == 4 for s in signature.inputs)
        options_inductor = dict(bo.get("inductor") or {})
        try:
            mode_options = _torch()._inductor.list_mode_options(mode)
        except RuntimeError:
            raise BuildError(f"unknown torch.compile mode '{mode}': use default, reduce-overhead, max-autotune "
                             "or max-autotune-no-cudagraphs") from None
        cudagraphs = cuda and bool({**mode_options, **options_inductor}.get("triton.cudagraphs"))
        benchmark_limit = _benchmark_limit(bo.get("cudnn_benchmark_limit"))  # checked on every device
        fuse_conv = bo.get("fuse_conv", "auto")
        if fuse_conv == "auto":
            fuse_conv = "dense" if cuda and kind != "aoti" and _has_conv2d(module) else False
        elif fuse_conv is True:
            fuse_conv = "all"
        elif fuse_conv not in (False, "dense", "all"):
            raise BuildError(f"fuse_conv must be auto, dense, all, true or false, not {fuse_conv!r}")
        if fuse_conv and kind == "aoti":
            raise BuildError("fuse_conv cannot be combined with compile=aoti (an AOTInductor package cannot call "
                             "enginesmith's fused operators): pass fuse_conv=false")
        fuse_linear = bo.get("fuse_linear", "auto")
        if fuse_linear == "auto":
            fuse_linear = cuda and kind != "aoti"
        elif not isinstance(fuse_linear, bool):
            raise BuildError(f"fuse_linear must be auto, true or false, not {fuse_linear!r}")
        fuse_mha = bo.get("fuse_mha", "auto")
        if fuse_mha == "auto":
            fuse_mha = cuda and has_packable_attention(module)
        elif not isinstance(fuse_mha, bool):
            raise BuildError(f"fuse_mha must be auto, true or false, not {fuse_mha!r}")
        fuse_gelu = bo.get("fuse_gelu", "auto")
        if fuse_gelu == "auto":
            # cuBLASLt's GELU epilogue computes GELU's tanh form: well under fp16's rounding, not under the
            # fp32 engines' 1e-4 check against the source.
            fuse_gelu = cuda and kind != "aoti" and precision in ("fp16", "bf16")
        elif not isinstance(fuse_gelu, bool):
            raise BuildError(f"fuse_gelu must be auto, true or false, not {fuse_gelu!r}")
        if fuse_gelu and kind == "aoti":
            raise BuildError("fuse_gelu cannot be combined with compile=aoti (an AOTInductor package cannot call "
                             "enginesmith's fused operators): pass fuse_gelu=false")
        patch_conv = bo.get("patch_conv", "auto")
        if patch_conv == "auto":
            patch_conv = cuda and kind != "aoti" and _has_conv2d(module)
        elif not isinstance(patch_conv, bool):
            raise BuildError(f"patch_conv must be auto, true or false, not {patch_conv!r}")
        fuse_attention = bo.get("fuse_attention", "auto")
        if fuse_attention == "auto":
            # fp32 attention on CUDA runs in fused kernels that missed the fp32 engines' 1e-4 check against
            # the source (BERT-style encoder on the H200: rel L2 1.8e-4); the fusion pays for fp16 speed.
            fuse_attention = not (cuda and precision == "fp32")
        elif not isinstance(fuse_attention, bool):
            raise BuildError(f"fuse_attention must be auto, true or false, not {fuse_attention!r}")
        return {
            "format": PAYLOAD_FORMAT,
            "device": device,
            "precision": precision,
            "compile": kind,
            "mode": mode,
            "inductor": options_inductor,
            "batches": batches if cuda else [],
            "warm_batches": warm,
            "dynamic": bool(dynamic),
            "cudagraphs": cudagraphs,
            # Inductor engines capture their CUDA graphs themselves (a plain graph per batch: see
            # compile._GraphedRunner), not through Inductor's graph trees. Absent in engines built before.
            "graphs": "captured" if cudagraphs and kind == "inductor" else None,
            "channels_last": bool(channels_last),
            "tf32": bool(bo.get("tf32", False)) and precision == "fp32",
            # "auto" until the build has timed cuDNN's search against its heuristics (cudnn_search)
            "cudnn_benchmark": wanted_search(bo.get("cudnn_benchmark"), cuda),
            "cudnn_benchmark_limit": benchmark_limit if cuda else None,
            "fuse_conv": fuse_conv,
            "fuse_linear": fuse_linear,
            "patch_conv": patch_conv,
            "fuse_gelu": fuse_gelu,
            "fuse_mha": fuse_mha,
            "fuse_attention": fuse_attention,
            # No cache-key tag (engines before 2026-12-03 had one per build): Inductor computes a Triton kernel's
            # autotuning key in whichever process compiles it, and its compile workers never see a tag, so a
            # tagged build recorded keys that the tagged load, rechecking in the main process, never found and
            # every load benchmarked its kernels again (9.8 s of EfficientNet-B0's 25.8 s warm load on the H200).
            "tag": "",
            "torch": self.version(),
            "triton": _triton_version() if cuda else "n/a",
        }

    def build(
        self,
        model: Any,
        signature: Signature,
        options: BuildOptions,
        progress: ProgressCallback | None = None,
        calibration: Calibration | None = None,
    ) -> BuildResult:
        """``model`` is an ONNX ModelProto, or natively a torch.nn.Module / torch.export.ExportedProgram
        taking the signature's inputs in order, or None with a usable ``options.native_source``."""
        torch = _torch()
        log = [f"PyTorch {torch.__version__}"]
        started = time.perf_counter()

        def step(stage: str, done: int, total: int | None) -> None:
            if progress:
                progress(stage, done, total)

        step("converting", 0, 1)
        source_choice = str(options.backend_options.get("source", "auto")).lower()
        if source_choice not in ("auto", "onnx"):
            raise BuildError(f"source must be auto (build a torch source directly) or onnx (from its ONNX conversion), "
                             f"not {source_choice!r}")
        # model None: the import's ONNX conversion is still running (the build is from the torch source)
        native = (usable_source(options.native_source, signature.input_names, signature.output_names, source_choice, log)
                  if model is None or isinstance(model, onnx.ModelProto) else None)
        if native is None and model is None:
            raise BuildError("the PyTorch backend was given neither an ONNX model nor a torch source it can use")
        if native is None and not isinstance(model, onnx.ModelProto):
            if not isinstance(model, (torch.export.ExportedProgram, torch.nn.Module)):
                raise BuildError(f"the PyTorch backend cannot build from a {type(model).__name__}")
            names = tuple(signature.input_names)
            native = NativeSource("torch", model, names, tuple(signature.output_names),
                                  description=f"torch {'module' if isinstance(model, torch.nn.Module) else 'program'} "
                                              f"{type(model).__name__}")
        if native is not None:
            inner, order = source_module(native), list(range(len(signature.inputs)))
            log.append(f"source: {native.description}, exported with torch.export directly (no ONNX conversion)")
        else:
            inner, order = onnx_to_torch(model, signature, log)
        convert_s = time.perf_counter() - started
        step("converting", 1, 1)
        meta = self._resolve(options, signature, inner, log)
        if meta["fuse_mha"]:
            log.append(f"nn.MultiheadAttention self-attention read from views of its projection: "
                       f"{pack_self_attention(inner) if native is not None else 0} modules")
        device = meta["device"]
        cuda = device.startswith("cuda")
        if cuda:
            facts = device_facts(device)
            log.append(f"device {facts['gpu']} (compute {facts['compute_capability']}), CUDA {facts['cuda']}, "
                       f"Triton {facts['triton_version']}, driver {facts['driver']}")
        dtype = _torch_dtype(meta["precision"])
        inner = inner.to(device=device, dtype=dtype)
        if native is None and dtype != torch.float32:
            retarget_casts(inner, dtype, log)
        if native is not None and retarget_program(inner, dtype, device):
            log.append(f"float32 constants of the exported program made {meta['precision']}")
        if meta["channels_last"]:
            inner = inner.to(memory_format=torch.channels_last)
        with torch.no_grad():  # each weight gets its own dense storage (onnx2torch keeps some as views)
            for tensor in list(inner.parameters()) + list(inner.buffers()):
                layout = torch.channels_last if meta["channels_last"] and tensor.dim() == 4 else torch.contiguous_format
                tensor.data = tensor.data.clone(memory_format=layout)
        wrapper = _wrapper_class()(
            inner, order, dtype,
            [np.dtype(s.dtype).kind == "f" for s in signature.inputs],
            [_torch_dtype(np.dtype(s.dtype).name) if np.dtype(s.dtype).kind in "fiub" else dtype for s in signature.outputs],
            meta["channels_last"],
        )
        # Flags only: the inner module is in eval mode already, and an ExportedProgram's module refuses train()/eval().
        for sub in wrapper.modules():
            sub.training = False
        log.append(f"precision {meta['precision']}" + (", channels-last" if meta["channels_last"] else "")
                   + (", TF32 allowed" if meta["tf32"] else (", TF32 off" if cuda and meta["precision"] == "fp32" else "")))
        step("exporting", 0, 1)
        export_started = time.perf_counter()
        sample_shapes = {name: list(np.shape(value)) for name, value in (options.sample_feeds or {}).items()
                         if name in signature.input_names}
        program = export_program(wrapper, signature, device, log, sample_shapes or None)
        export_s = time.perf_counter() - export_started
        step("exporting", 1, 1)
        program_bytes = _save_program(program)
        program = _load_program(program_bytes)  # compile exactly what load() will compile
        # Read off the reloaded program: in the traced one a fixed dim can still be a symbol with a one-value range.
        self._record_served_shapes(program, signature, meta, sample_shapes, log)
        meta["served_ranges"] = allow_size_one(wrapper, program, signature, meta["served_ranges"], device, log,
                                               lambda: cpu_copies(wrapper, program_bytes, _load_program))
        eager = program.module()
        runnable = _fused_module(program, meta, log) if needs_rewrite(meta) else eager
        cache: bytes | None = None
        aoti: bytes | None = None
        kernel_libraries: dict[str, bytes] = {}
        warm_s: dict[int, float] = {}
        graphed_from = None  # the runner the CUDA graphs were captured from
        _set_cudnn_benchmark(torch, meta)
        compile_started = time.perf_counter()
        compile_breakdown: dict[str, float] = {}  # per batch: Dynamo tracing, Inductor, the first calls
        step("compiling", 0, len(meta["warm_batches"]))
        if meta["compile"] == "eager":
            compiled = runnable
            log.append("compile=eager: the exported program runs uncompiled (no Inductor)")
        elif meta["compile"] == "aoti":
            # AOTInductor wants example inputs (size hints for autotuning); the saved program has none.
            program.example_inputs = (tuple(example_inputs(signature, meta["warm_batches"][0], device,
                                                             known=meta.get("example_shapes"))), {})
            with tempfile.TemporaryDirectory(prefix="enginesmith-aoti-") as tmp:
                try:
                    aoti = _aoti_compile(program, meta, tmp)
                except Exception as exc:  # noqa: BLE001
                    raise BuildError(f"AOTInductor compile failed: {str(exc).splitlines()[0][:300]}") from None
            compiled = _aoti_load(aoti, device, probe=False)  # the compiling process itself loaded it before
            log.append(f"AOTInductor package compiled ({len(aoti) / 2**20:.1f} MiB, mode {meta['mode']}) in "
                       f"{time.perf_counter() - compile_started:.1f} s")
            if cuda and meta["cudagraphs"]:
                graphed_from = compiled
                compiled = _GraphedRunner(compiled, signature, device, meta["batches"], log, meta.get("example_shapes"))
        else:
            compiled = compile_module(runnable, meta)
            if cuda and meta["precision"] == "fp32":
                _set_fp32_math(torch, meta["tf32"])
            # On the CPU the compiled C++ kernels go into the payload too (native_kernels): compiled in a
            # folder of their own, they are this engine's alone.
            with (nullcontext() if cuda else native_kernels.private_cache_dir()) as private_folder:
                with _fresh_artifacts(), _cache_tag(meta["tag"]):
                    try:
                        warm_s = _warm(compiled, meta, signature, device, compile_breakdown)
                    except Exception as exc:  # noqa: BLE001 - Inductor failures are build failures
                        raise BuildError(f"Inductor could not compile the model: {_compile_failure(exc)}") from None
                    saved = torch.compiler.save_cache_artifacts()
                kernel_libraries = native_kernels.collect(private_folder) if private_folder is not None else {}
            cache = saved[0] if saved else None
            if captured_graphs(meta):
                graphed_from = compiled
                compiled = _GraphedRunner(compiled, signature, device, meta["batches"], log, meta.get("example_shapes"))
            where = "CUDA, fixed batches " + ", ".join(map(str, meta["batches"])) if cuda else (
                "CPU, dynamic batch" if meta["dynamic"] else "CPU")
            log.append(
                f"Inductor mode '{meta['mode']}' ({where}{', CUDA graphs' if meta['cudagraphs'] else ''})"
                + ("" if cuda else ": no autotuning on the CPU, so builds stay fast")
                + f"; compile {sum(warm_s.values()):.1f} s"
                + (f"; compiler cache {len(cache) / 2**20:.1f} MiB stored for warm loads" if cache else "; no compiler cache recorded")
                + (f", with {len(kernel_libraries)} compiled kernel libraries "
                   f"({sum(map(len, kernel_libraries.values())) / 2**20:.1f} MiB)" if kernel_libraries else "")
            )
        compiled, cudnn_timings = settle_cudnn_search(meta, program, compiled, graphed_from, signature, log)
        compile_s = time.perf_counter() - compile_started
        step("compiling", len(meta["warm_batches"]), len(meta["warm_batches"]))
        check = self._self_check(compiled, eager, meta, signature)
        meta_out = {k: v for k, v in meta.items() if k != "warm_batches"}
        meta_out["warm_batches"] = meta["warm_batches"]
        meta_out["build_seconds"] = round(time.perf_counter() - started, 2)
        payload = pack_payload(meta_out, program_bytes, cache, aoti, kernel_libraries)
        session = TorchSession(compiled, runnable, meta_out, signature)
        _HANDOFF.clear()
        _HANDOFF[hashlib.sha256(payload).hexdigest()] = session
        backend_options = {**options.backend_options, "device": device, "compile": meta["compile"], "mode": meta["mode"]}
        if cuda:
            backend_options["batches"] = meta["batches"]
        resolved = BuildOptions(precision=meta["precision"], threads=options.threads, force_precision=options.force_precision,
                                calibration_method=options.calibration_method, backend_options=backend_options)
        details = {
            "device": device,
            "compile": meta["compile"],
            "mode": meta["mode"],
            "batches": meta["batches"],
            "dynamic": meta["dynamic"],
            "cudagraphs": meta["cudagraphs"],
            "channels_last": meta["channels_last"],
            "cudnn_benchmark": meta["cudnn_benchmark"],
            "cudnn_benchmark_limit": meta["cudnn_benchmark_limit"],
            "cudnn_search_ms": cudnn_timings,
            "fuse_conv": meta["fuse_conv"],
            "fuse_linear": meta["fuse_linear"],
            "patch_conv": meta["patch_conv"],
            "fuse_gelu": meta["fuse_gelu"],
            "fuse_mha": meta["fuse_mha"],
            "fuse_attention": meta["fuse_attention"],
            "inductor_options": meta["inductor"],
            "convert_seconds": round(convert_s, 2),
            "export_seconds": round(export_s, 2),
            "compile_seconds": round(compile_s, 2),
            "compile_seconds_per_batch": {str(k): v for k, v in warm_s.items()},
            "compile_breakdown": compile_breakdown,
            "build_seconds": meta_out["build_seconds"],
            "cache_bytes": len(cache or b""),
            "program_bytes": len(program_bytes),
            "compiled_vs_exported_rel_l2": check,
            "served_shapes": meta["served_shapes"],
            "source": "torch" if native is not None else "onnx",
        }
        return BuildResult(payload=payload, payload_name=PAYLOAD_NAME, resolved_options=resolved, log=log, details=details)

    @staticmethod
    def _record_served_shapes(program, signature: Signature, meta: dict[str, Any],
                              sample_shapes: Mapping[str, list[int]], log: list[str]) -> None:
        """The shapes the program serves, into meta (the session checks inputs against them) and the log.

        Warm-up and self-check inputs then use the samples' sizes for the open dims, and a batch the
        program fixed becomes the only batch compiled.
        """
        served = served_shapes(program, signature)
        meta["served_shapes"] = served
        meta["served_ranges"] = served_ranges(program, signature)
        meta["example_shapes"] = {name: [d if d is not None else (sample_shapes.get(name) or [2] * len(shape))[axis]
                                         for axis, d in enumerate(shape)] if name in sample_shapes else None
                                  for name, shape in served.items()}
        meta["example_shapes"] = {k: v for k, v in meta["example_shapes"].items() if v is not None} or None
        fixed = specialized_dims(served, signature)
        if not fixed:
            return
        log.append("the engine serves " + ", ".join(f"{name}: {shape_text(served[name])}" for name in fixed)
                   + " (dims the model cannot keep symbolic are fixed at the "
                   + ("build's sample sizes" if sample_shapes else "example sizes") + "; other sizes are refused)")
        batches = {served[name][0] for name in fixed if 0 in fixed[name]}
        if batches:
            batch = int(batches.pop())
            meta["warm_batches"] = [batch]
            meta["dynamic"] = False
            if meta["batches"]:
                meta["batches"] = [batch]

    def _self_check(self, compiled, eager, meta, signature: Signature) -> dict[str, float]:
        """Relative L2 distance of the compiled (and fused) program from the exported one, per compiled batch."""
        torch = _torch()
        if compiled is eager:
            return {}
        result = {}
        for batch in meta["warm_batches"]:
            inputs = example_inputs(signature, batch, meta["device"], seed=1000 + batch, known=meta.get("example_shapes"))
            with torch.no_grad():
                got = compiled(*inputs)
                want = eager(*inputs)
            got = got if isinstance(got, (tuple, list)) else (got,)
            want = want if isinstance(want, (tuple, list)) else (want,)
            worst = 0.0
            for g, w in zip(got, want):
                if not w.is_floating_point():
                    continue
                g64, w64 = g.double(), w.double()
                worst = max(worst, float(torch.linalg.vector_norm(g64 - w64) / torch.linalg.vector_norm(w64).clamp_min(1e-30)))
            result[str(batch)] = worst
        return result

    # ---------------------------------------------------------------- load

    def load(self, payload: bytes | Path, options: BuildOptions, signature: Signature) -> Session:
        torch = _torch()
        data = payload if isinstance(payload, bytes) else Path(payload).read_bytes()
        handed = _HANDOFF.pop(hashlib.sha256(data).hexdigest(), None)
        if handed is not None:  # the session the build just compiled; the process settings are set again all the same
            _set_cudnn_benchmark(torch, handed.meta)
            return handed
        started = time.perf_counter()
        steps: dict[str, float] = {}

        def lap(name: str, since: float) -> float:
            now = time.perf_counter()
            steps[name] = round(now - since, 2)
            return now

        meta, program_bytes, cache, aoti = unpack_payload(data)
        cuda = meta["device"].startswith("cuda")
        mark = started
        if cuda:
            resolve_device(meta["device"])  # raises a clear error without a GPU
            _set_cudnn_benchmark(torch, meta)
            mark = lap("device", started)
        eager = None
        if meta["compile"] != "aoti":  # an AOTInductor model serves every batch size itself
            try:
                program = _load_program(program_bytes)
            except BuildError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise BuildError(f"PyTorch could not load the engine's program: {str(exc).splitlines()[0][:300]}") from None
            eager = _fused_module(program, meta, []) if needs_rewrite(meta) else program.module()
        mark = lap("program", mark)
        info = ""
        breakdown: dict[str, float] = {}  # compile_batch_N split into tracing, Inductor and the first calls
        if meta["compile"] == "eager":
            compiled = eager
        elif meta["compile"] == "aoti":
            if aoti is None:
                raise BuildError("the engine was built with AOTInductor but carries no package: rebuild it")
            compiled = _aoti_load(aoti, meta["device"])
            mark = lap("aoti_package", mark)
            if cuda and meta.get("cudagraphs"):
                notes: list[str] = []
                compiled = _GraphedRunner(compiled, signature, meta["device"], meta.get("batches") or [], notes,
                                           meta.get("example_shapes"))
                info = "; ".join(notes)
                lap("cuda_graphs", mark)
        else:
            if cache and os.environ.get(CACHES_ENV, "1") != "0":
                loaded = torch.compiler.load_cache_artifacts(cache)
                info = "compiler cache loaded" if loaded is not None else "compiler cache unreadable here (recompiling)"
                if not cuda and loaded is not None:
                    written = native_kernels.install(read_native(data))
                    info += f", {written} compiled kernel libraries installed" if written else ""
            else:
                info = "compiler cache not used (recompiling)"
            mark = lap("cache_artifacts", mark)
            compiled = compile_module(eager, meta)
            if cuda and meta["precision"] == "fp32":
                _set_fp32_math(torch, bool(meta.get("tf32")))
            with _cache_tag(meta["tag"]):
                for batch, seconds in _warm(compiled, meta, signature, meta["device"], breakdown).items():
                    steps[f"compile_batch_{batch}"] = seconds
            if captured_graphs(meta):
                mark = time.perf_counter()
                notes = []
                compiled = _GraphedRunner(compiled, signature, meta["device"], meta.get("batches") or [], notes,
                                          meta.get("example_shapes"))
                if not compiled.captured:  # the reason goes where a user reads how the engine loaded
                    info = "; ".join([info, *notes])
                lap("cuda_graphs", mark)
        session = TorchSession(compiled, eager, meta, signature, load_seconds=time.perf_counter() - started, cache_info=info)
        session.load_steps = steps
        session.load_breakdown = breakdown
        return session
