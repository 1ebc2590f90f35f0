"""One matrix product for linear layers that read the same tensor (``torch_compile`` package).

Attention's query, key and value projections are three linear layers over one input. At
small batches each product fills a few of the GPU's multiprocessors (BERT at batch 1 and
sequence 128: a 128x768 by 768x768 product is six 128x128 tiles on an H200's 132 SMs),
and Inductor, without ``freezing``, keeps them apart. Concatenating their weights makes one
product three times as wide, followed by a split:

    linear(x, Wq, bq), linear(x, Wk, bk), linear(x, Wv, bv)
        -> split(linear(x, cat(Wq, Wk, Wv), cat(bq, bk, bv)), [q, k, v], -1)

ONNX graphs hold linear layers as ``MatMul`` by a constant weight plus an ``Add`` of the bias
(only ``Gemm`` converts to ``linear``), so they are first turned back into ``aten.linear``
(``matmuls_as_linears``): then they merge too, and the bias rides in the product's epilogue
instead of a separate pass over the output.

A convolution whose kernel is its stride and which pads nothing (ViT's patch embedding, a
ConvNeXt stem) reads each input pixel once: it is a linear layer over non-overlapping patches
(``patch_convs_as_linears``). cuDNN runs it as a convolution all the same: ViT-B/16's 16x16
stride-16 embedding at batch 64 in fp16 took 0.38 ms on the H200, the same product as one
matrix multiply after a patch gather 0.08 ms (of a 6.7 ms engine call).

Like ``fusion``, the rewrites run on the module of an exported program just before
``torch.compile``, at build and again at load, so the saved program stays as exported.
"""

from __future__ import annotations

import operator
from collections import defaultdict

from .common import _torch
from .fusion import _attribute, _conv_args


def _linear_operands(gm, node):
    """(weight, bias or None) tensors of an ``aten.linear`` node whose weight and bias are constants, else None."""
    torch = _torch()
    if node.op != "call_function" or node.target is not torch.ops.aten.linear.default or node.kwargs:
        return None
    weight = _attribute(gm, node.args[1]) if len(node.args) > 1 else None
    bias_node = node.args[2] if len(node.args) > 2 else None
    bias = _attribute(gm, bias_node) if bias_node is not None else None
    if weight is None or weight.dim() != 2 or (bias_node is not None and bias is None):
        return None
    return weight, bias


def matmuls_as_linears(gm) -> int:
    """``matmul(x, W) [+ b]`` with constant 2-D W (and 1-D b of W's width) as ``linear(x, W.T, b)``; how many."""
    torch = _torch()
    aten = torch.ops.aten
    graph = gm.graph
    rewritten = 0
    transposed: dict[str, str] = {}
    for product in list(graph.nodes):
        if product.op != "call_function" or product.target is not aten.matmul.default or product.kwargs:
            continue
        x, weight = product.args[0], _attribute(gm, product.args[1])
        x_val = getattr(x, "meta", {}).get("val")
        if weight is None or weight.dim() != 2 or x_val is None or x_val.dim() < 2 or x_val.dtype != weight.dtype:
            continue  # a 1-D x is a vector product, not a linear layer
        bias_node, add = None, None
        users = list(product.users)
        if len(users) == 1 and users[0].target is aten.add.Tensor and len(users[0].args) == 2 and not users[0].kwargs:
            other = users[0].args[1] if users[0].args[0] is product else users[0].args[0]
            candidate = _attribute(gm, other)
            if (candidate is not None and candidate.dim() == 1 and candidate.shape[0] == weight.shape[1]
                    and candidate.dtype == weight.dtype):
                bias_node, add = other, users[0]
        source = str(product.args[1].target)
        name = transposed.get(source)
        if name is None:  # one transposed copy per weight, however many products read it
            name = f"_enginesmith_linear_{len(transposed)}_weight"
            while hasattr(gm, name):  # a module rewritten before
                name = "_" + name
            transposed[source] = name
            with torch.no_grad():
                gm.register_buffer(name, weight.t().contiguous())
        with graph.inserting_before(add if add is not None else product):
            args = (x, graph.get_attr(name)) + ((bias_node,) if bias_node is not None else ())
            linear = graph.call_function(aten.linear.default, args)
        replaced = add if add is not None else product
        linear.meta.update(replaced.meta)
        replaced.replace_all_uses_with(linear)
        graph.erase_node(replaced)
        if add is not None:
            graph.erase_node(product)
        rewritten += 1
    if rewritten:
        _drop_unused_constants(gm)
        gm.recompile()
    return rewritten


def _patch_conv_shape(node) -> tuple[int, int, int, int, int, int] | None:
    """(channels, height, width, out channels, kernel height, kernel width) of an aten.conv2d node that is a
    linear layer over non-overlapping patches: kernel = stride > 1 pixel, no padding or dilation, one group,
    static input sizes the kernel divides; else None."""
    torch = _torch()
    if node.op != "call_function" or node.target is not torch.ops.aten.conv2d.default:
        return None
    args = _conv_args(node)
    if args is None:
        return None
    x, weight, _bias, stride, padding, dilation, groups = args
    x_val, w_val = x.meta["val"], weight.meta["val"]
    kernel = [int(k) for k in w_val.shape[2:]]
    sizes = x_val.shape[1:]
    if (groups != 1 or list(stride) != kernel or padding != [0, 0] or dilation != [1, 1] or kernel == [1, 1]
            or not all(isinstance(s, int) for s in sizes) or x_val.dtype != w_val.dtype):
        return None
    channels, height, width = sizes
    if height % kernel[0] or width % kernel[1] or channels != w_val.shape[1]:
        return None
    return channels, height, width, int(w_val.shape[0]), kernel[0], kernel[1]


def patch_convs_as_linears(gm) -> int:
    """Rewrite convolutions of ``gm`` whose kernel is their stride as a patch gather and one linear layer; how many.

    ``conv2d(x, W, b, stride=k)`` over [N, C, H, W] becomes ``linear(patches(x), W.reshape(O, C*k*k), b)``
    with patches ordered (C, ky, kx) like W's own rows; the result comes back as [N, O, H/k, W/k] in
    channels-last memory, the layout a channels-last convolution gives (and the one ViT's flatten to
    [N, H/k * W/k, O] reads without a copy). The batch may be symbolic."""
    torch = _torch()
    aten = torch.ops.aten
    graph = gm.graph
    rewritten = 0
    for conv in list(graph.nodes):
        shape = _patch_conv_shape(conv)
        if shape is None:
            continue
        channels, height, width, out_channels, ky, kx = shape
        x, weight, bias = _conv_args(conv)[:3]
        rows, cols = height // ky, width // kx
        with graph.inserting_before(conv):
            blocks = graph.call_function(aten.reshape.default, (x, [-1, channels, rows, ky, cols, kx]))
            patches = graph.call_function(aten.permute.default, (blocks, [0, 2, 4, 1, 3, 5]))
            flat = graph.call_function(aten.reshape.default, (patches, [-1, channels * ky * kx]))
            matrix = graph.call_function(aten.reshape.default, (weight, [out_channels, channels * ky * kx]))
            product = graph.call_function(aten.linear.default, (flat, matrix) + ((bias,) if bias is not None else ()))
            grid = graph.call_function(aten.reshape.default, (product, [-1, rows, cols, out_channels]))
            result = graph.call_function(aten.permute.default, (grid, [0, 3, 1, 2]))
        _fake_values([blocks, patches, flat, matrix, product, grid, result])
        conv.replace_all_uses_with(result)
        graph.erase_node(conv)
        rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten


def _fake_values(nodes) -> None:
    """Give new nodes the ``meta["val"]`` later rewrites read, by running their ops on their inputs' fake tensors."""
    from torch.fx.node import map_arg

    for node in nodes:
        try:
            args = map_arg(node.args, lambda n: n.meta["val"])
            node.meta["val"] = node.target(*args)
        except Exception:  # noqa: BLE001 - a value is a convenience for later passes, not needed to run
            return


def concat_sibling_linears(gm) -> int:
    """Merge linear layers of ``gm`` that share their input into one product each; how many products were merged away."""
    torch = _torch()
    aten = torch.ops.aten
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    merged = 0
    for source in list(graph.nodes):
        groups: dict[tuple, list] = defaultdict(list)
        for user in source.users:
            operands = _linear_operands(gm, user)
            if operands is None or user.args[0] is not source:
                continue
            weight, bias = operands
            groups[(weight.shape[1], weight.dtype, weight.device, bias is None)].append((user, weight, bias))
        for members in groups.values():
            if len(members) < 2:
                continue
            members.sort(key=lambda m: order[m[0]])
            first = members[0][0]
            sizes = [int(weight.shape[0]) for _, weight, _ in members]
            with torch.no_grad():
                weight = torch.cat([w for _, w, _ in members]).contiguous()
                bias = None if members[0][2] is None else torch.cat([b for _, _, b in members]).contiguous()
            prefix = f"_enginesmith_siblings_{merged}"
            gm.register_buffer(f"{prefix}_weight", weight)
            if bias is not None:
                gm.register_buffer(f"{prefix}_bias", bias)
            with graph.inserting_before(first):
                args = [source, graph.get_attr(f"{prefix}_weight")]
                if bias is not None:
                    args.append(graph.get_attr(f"{prefix}_bias"))
                product = graph.call_function(aten.linear.default, tuple(args))
                parts = graph.call_function(aten.split_with_sizes.default, (product, sizes, -1))
                pieces = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
            for (user, _, _), piece in zip(members, pieces):
                user.replace_all_uses_with(piece)
                graph.erase_node(user)
            merged += len(members) - 1
    if merged:
        _drop_unused_constants(gm)
        gm.recompile()
    return merged


def _drop_unused_constants(gm) -> None:
    """Remove get_attr nodes nothing reads any more, and their tensors (the separate weights the merge replaced)."""
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or node.users:
            continue
        target = str(node.target)
        gm.graph.erase_node(node)
        if any(other.op == "get_attr" and str(other.target) == target for other in gm.graph.nodes):
            continue
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        for table in (owner._parameters, owner._buffers):
            if name in table:
                del table[name]
                break
        else:
            if hasattr(owner, name):
                delattr(owner, name)
