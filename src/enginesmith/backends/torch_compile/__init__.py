"""PyTorch Inductor backend: ``torch.export`` + ``torch.compile`` engines for NVIDIA GPUs (and a CPU path).

Build
    A PyTorch source (an ``nn.Module`` or ExportedProgram the torch importer handed over,
    see ``enginesmith.native_source``) is used as it is (``native``); its outputs (dicts,
    ``ModelOutput`` dataclasses, tuples) are flattened into the signature's named outputs.
    ONNX models are converted to PyTorch with onnx2torch and ``onnx_ops``' converters (after ONNX Runtime's
    provider-independent *basic* graph optimizations: constant folding, Dropout and
    Identity removal, Conv+BatchNorm folding), constant shape arguments are baked in,
    and the module is wrapped so it takes and returns the signature's dtypes while
    computing in the engine's precision (fp32, fp16 or bf16; channels-last on CUDA for
    convolutional models). ``torch.export`` turns it into an ExportedProgram (dynamic
    batch unless the signature fixes it; other open dims sized like the build's samples and
    fixed where the model cannot keep them symbolic: ``meta["served_shapes"]``, checked by
    the session), which is compiled by Inductor for this
    device: ``max-autotune`` (Triton/cuDNN autotuning + CUDA graphs) on CUDA for the
    fixed batch sizes in ``backend_options["batches"]``, no autotuning on the CPU. On
    CUDA, conv -> ReLU and conv -> add -> ReLU chains become cuDNN convolutions with
    fused epilogues first (``fusion``).

Payload
    A zip holding ``meta.json``, ``program.pt2`` (``torch.export.save``, checked on
    load to hold only JSON and raw tensors, so loading it unpickles nothing) and
    ``inductor_cache.bin`` (``torch.compiler.save_cache_artifacts()``: the compiled
    graphs, Triton kernels and autotuning results). Loading replays the cache, so a
    load on the same platform takes seconds instead of the minutes of autotuning.
    The artifacts keep Inductor's own cache keys: a per-build key tag (engines built
    before 2026-12-03) made the Triton autotuning results unfindable at load, since
    compile workers compute those keys without the tag. A CPU engine also carries the
    C++ kernel libraries Inductor compiled (``native/``, see ``native_kernels``), which
    the artifacts leave out; ``ENGINESMITH_TORCH_KERNEL_LIBRARIES=0`` compiles them again.
    The compiler cache is *code* (pickled compiled graphs and kernel binaries): load
    engines of this backend only from builders you trust, or set
    ``ENGINESMITH_TORCH_CACHES=0`` to ignore the cache and recompile on load.

Backend options (``BuildOptions.backend_options``)
    ``device``     "auto" (CUDA when available), "cuda", "cuda:N" or "cpu"
    ``compile``    "inductor" (default), "eager" (run the exported program uncompiled)
                   or "aoti" (AOTInductor package, see ``_aoti_*``; experimental: on the H100 image
                   its packages crashed when loaded in a fresh process, so load() probes them
                   in a child process first)
    ``mode``       torch.compile mode; default "max-autotune" on CUDA, "default" on CPU
    ``batches``    batch sizes compiled ahead on CUDA (default: the fixed batch, else [1]);
                   other batch sizes run the exported program uncompiled, so no call
                   triggers minutes of autotuning
    ``tf32``       allow TF32 in fp32 engines (default False: only when the budget allows)
    ``channels_last``  "auto" (CUDA + 4-D convolution inputs), true or false
    ``inductor``   extra Inductor options, e.g. {"coordinate_descent_tuning": false} or {"freezing": true}
    ``cudnn_benchmark``  let cuDNN time its convolution algorithms for each shape: "auto" (default
                   on CUDA), true or false (process-wide, like PyTorch's flag, and never turned off).
                   The build always searches (Inductor's autotuning compares against the cuDNN
                   convolution); "auto" then times the engine's CUDA graphs against a capture with
                   cuDNN's heuristics and keeps the heuristics when they are as fast (within 2% at
                   every batch), so the load need not search again: the search is seconds per
                   distinct convolution shape on every load (``cudnn_search``)
    ``cudnn_benchmark_limit``  how many cuDNN algorithms that search times per shape (PyTorch's
                   default 10; 0 times every one): recorded, and set again at load
    ``fuse_conv``  "auto" (= "dense" on CUDA for convolutional models, else false), "dense"
                   (ungrouped convolutions only), "all" (also grouped/depthwise ones; true means
                   "all") or false: conv2d -> ReLU and conv2d -> add -> ReLU run as cuDNN
                   convolutions with fused epilogues (``fusion``); the rewrite is applied before
                   compiling, at build and at load, so the saved program stays plain ATen. Not
                   with compile="aoti".
    ``fuse_linear``  "auto" (on CUDA), true or false: products by a constant weight plus a bias
                   (how ONNX spells linear layers) run as linear layers, and linear layers that read
                   the same tensor (attention's query/key/value projections) as one product over
                   concatenated weights, then a split (``linear_fusion``); applied like ``fuse_conv``.
    ``patch_conv``  "auto" (on CUDA for convolutional models), true or false: convolutions whose
                   kernel is their stride, with no padding (ViT's patch embedding, ConvNeXt's stem), run
                   as one linear layer over the gathered patches (``linear_fusion``); applied like ``fuse_conv``.
    ``fuse_mha``   "auto" (on CUDA for torch sources that hold one), true or false: a torch source's
                   batch-first ``nn.MultiheadAttention`` (torchvision's ViT) runs self-attention from views
                   of its one projection, without the contiguous copy of query/key/value (``mha``).
    ``fuse_gelu``  "auto" (on for fp16 and bf16 engines on CUDA), true or false: GELU after a linear
                   layer runs in the product's cuBLASLt epilogue, in GELU's tanh form (``gelu_fusion``).
    ``fuse_attention``  "auto" (on, except fp32 engines on CUDA, whose fused fp32 attention kernels
                   are less exact than the written-out ops), true or false: attention written out op
                   by op (matmul, scale, mask, softmax, matmul: what ONNX exports hold) runs as one
                   ``scaled_dot_product_attention`` (``attention_fusion``); applied like ``fuse_conv``.
    ``source``     "auto" (a torch source is built directly) or "onnx" (from its ONNX conversion)

Modules
    ``common``        lazy torch import, devices, example inputs
    ``onnx_convert``  ONNX -> torch (onnx2torch, ``onnx_ops`` converters, the model's outputs)
    ``onnx_shape_values``  shape arithmetic as Python values, for torch.export
    ``native``        torch sources built directly (flattened inputs and outputs)
    ``onnx_ops``      converters for opset 17-21 ops onnx2torch lacks or refuses; their modules
                      in ``onnx_op_modules``, GRU/LSTM in ``onnx_rnn``, If in ``onnx_if``, NMS in ``onnx_nms``
    ``export``        the wrapper module, torch.export, the shapes the program serves
    ``payload``       the payload zip and its pickle-free program check
    ``compile``       Inductor options, compiler caches, warm-up, AOTInductor
    ``fusion``        cuDNN-fused convolution epilogues
    ``linear_fusion`` sibling linear layers merged into one product, patch convolutions as products
    ``attention_fusion`` written-out attention as one scaled_dot_product_attention
    ``mha``           nn.MultiheadAttention self-attention from views of its projection
    ``gelu_fusion``   linear + GELU as one product with cuBLASLt's bias+GELU epilogue
    ``session``       the runtime session
    ``device_ops``    detectors' pre- and post-processing on the engine's device
    ``backend``       ``TorchCompileBackend``: build and load
"""

from __future__ import annotations

from .backend import _HANDOFF, TorchCompileBackend
from .common import CACHES_ENV, PAYLOAD_FORMAT, PAYLOAD_NAME, TORCH_PRECISIONS, device_facts, example_inputs, resolve_device
from .compile import _set_fp32_math, compile_module, inductor_options
from .export import export_program
from .onnx_convert import _onnx2torch, onnx_to_torch, op_status
from .payload import pack_payload, unpack_payload
from .session import TorchSession

__all__ = [
    "CACHES_ENV", "PAYLOAD_FORMAT", "PAYLOAD_NAME", "TORCH_PRECISIONS", "TorchCompileBackend", "TorchSession",
    "compile_module", "device_facts", "example_inputs", "export_program", "inductor_options", "onnx_to_torch",
    "op_status", "pack_payload", "resolve_device", "unpack_payload", "_HANDOFF", "_onnx2torch", "_set_fp32_math",
]
