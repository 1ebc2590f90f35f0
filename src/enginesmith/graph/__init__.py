"""Graph passes, inspection and compatibility reports on ONNX models.

``inspect``    layer table (shapes, parameters, FLOPs/MACs), op histogram, totals
``compat``     per-node support for onnxruntime (asked directly), tensorrt:8.6|10 (published tables), other backends
``passes``     named passes ModelProto -> ModelProto and ``optimize()``, which checks each one numerically
``surgery``    fix shapes, dynamic axes, rename I/O, cut a subgraph, opset conversion
``layerwise``  the first layer where an engine's intermediate tensors leave the source's
``precision``  the fp16 rewrite (onnxruntime's offline graph converter; no session)

Running a model (numerical checks, layer-wise comparison) goes through
``enginesmith.backends.onnxruntime``; nothing here imports a backend library.
"""
