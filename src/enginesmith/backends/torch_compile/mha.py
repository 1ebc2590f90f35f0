"""``nn.MultiheadAttention`` self-attention read from its one projection through views (``torch_compile`` package).

``F.multi_head_attention_forward`` projects query, key and value with one product, then makes
the result contiguous as [3, L, N, E] before splitting it into heads, and torch.export keeps
that ``.contiguous()``: Inductor writes the whole projection out again (ViT-B/16's engine at
batch 64 on the H200 spent 0.42 ms of a 6.6 ms call in those copies; eager PyTorch's fused
multi-head-attention path has none). The same attention taken as views of the product,
[N, L, 3, H, D] permuted to three [N, H, L, D] tensors, needs no copy:
``scaled_dot_product_attention`` reads strided inputs whose last dimension is dense, and
Inductor passes aligned views to it as they are.

Torch sources only (ONNX graphs hold no such modules): the build swaps the modules in its
own copy of the source before torch.export, so the exported program holds the views. Calls
the views do not cover (attention weights asked for, masks, cross-attention, training) go to
the original module unchanged.

On the H200 (fp16, ``benchmarks/results/gpu_zoo_h200_max_autotune_8.json``) ViT-B/16's engine
went from 0.561 to 0.506 ms at batch 1 and from 6.131 to 5.550 ms at batch 64, with 36 fewer
kernels per call; so the build applies it on CUDA by default (``fuse_mha="auto"``).
"""

from __future__ import annotations

from typing import Any

from .common import _torch

_CLASS: Any = None


def _packed_class() -> type:
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    torch = _torch()
    functional = torch.nn.functional

    class PackedSelfAttention(torch.nn.Module):
        """Self-attention of a batch-first ``nn.MultiheadAttention`` from views of its input projection."""

        def __init__(self, attention: Any):
            super().__init__()
            self.attention = attention

        def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            attention = self.attention
            if (query is not key or key is not value or need_weights or key_padding_mask is not None
                    or attn_mask is not None or is_causal or attention.training or query.dim() != 3):
                return attention(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                 attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
            batch, length, width = query.shape
            heads = attention.num_heads
            projected = functional.linear(query, attention.in_proj_weight, attention.in_proj_bias)
            q, k, v = projected.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
            mixed = functional.scaled_dot_product_attention(q, k, v)
            mixed = mixed.transpose(1, 2).reshape(batch, length, width)
            return functional.linear(mixed, attention.out_proj.weight, attention.out_proj.bias), None

    _CLASS = PackedSelfAttention
    return _CLASS


def _packable(module: Any) -> bool:
    torch = _torch()
    return (isinstance(module, torch.nn.MultiheadAttention) and module.batch_first and module._qkv_same_embed_dim
            and module.in_proj_weight is not None and module.bias_k is None and module.bias_v is None
            and not module.add_zero_attn)


def has_packable_attention(root: Any) -> bool:
    """Whether ``root`` holds a module ``pack_self_attention`` would swap (what ``fuse_mha=auto`` looks for)."""
    return any(_packable(module) for module in root.modules())


def pack_self_attention(root: Any) -> int:
    """Swap every batch-first ``nn.MultiheadAttention`` under ``root`` (in place) for one that runs
    self-attention from views of its projection; how many were swapped. ``root`` must be the build's copy."""
    packed = _packed_class()
    swapped = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if _packable(child):
                setattr(parent, name, packed(child))
                swapped += 1
    return swapped
