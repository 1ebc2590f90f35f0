"""The architectures of the GPU zoo (benchmarks/gpu_zoo.py) and their seeded inputs.

torchvision's ResNet-50, MobileNetV3-Large, EfficientNet-B0, ConvNeXt-Tiny and ViT-B/16, a YOLOv8s-like detector
written here after Ultralytics' layout, and transformers' BERT-base- and MiniLM-size encoders built from configs;
all with seeded random weights (the GPU machine cannot download any), made non-degenerate before accuracy is
measured. ``yolo_tiny`` and ``bert_tiny`` are the same code paths at toy sizes for CPU dry runs and CI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import zoo_training

SEQ = 128


# --------------------------------------------------------------------------- models


def _yolo_classes():
    import torch
    from torch import nn

    def conv(c1: int, c2: int, k: int = 1, s: int = 1) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU())

    class Bottleneck(nn.Module):
        def __init__(self, c: int, shortcut: bool):
            super().__init__()
            self.cv1, self.cv2, self.add = conv(c, c, 3), conv(c, c, 3), shortcut

        def forward(self, x):
            y = self.cv2(self.cv1(x))
            return x + y if self.add else y

    class C2f(nn.Module):
        def __init__(self, c1: int, c2: int, n: int, shortcut: bool = True):
            super().__init__()
            self.c = c2 // 2
            self.cv1, self.cv2 = conv(c1, 2 * self.c), conv((2 + n) * self.c, c2)
            self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

        def forward(self, x):
            y = list(self.cv1(x).chunk(2, 1))
            for block in self.m:
                y.append(block(y[-1]))
            return self.cv2(torch.cat(y, 1))

    class SPPF(nn.Module):
        def __init__(self, c1: int, c2: int):
            super().__init__()
            self.cv1, self.cv2 = conv(c1, c1 // 2), conv(c1 // 2 * 4, c2)
            self.pool = nn.MaxPool2d(5, 1, 2)

        def forward(self, x):
            y = [self.cv1(x)]
            for _ in range(3):
                y.append(self.pool(y[-1]))
            return self.cv2(torch.cat(y, 1))

    class YoloV8Like(nn.Module):
        """YOLOv8's layout (C2f backbone, SPPF, PAN neck, decoupled head with DFL box decoding), as exported
        for inference: one tensor [batch, 4 + classes, anchors] (boxes as distances, class probabilities)."""

        def __init__(self, width: float = 0.5, depth: float = 0.34, classes: int = 80, reg_max: int = 16):
            super().__init__()

            def ch(c: int) -> int:
                return max(8, int(c * width) // 8 * 8)

            def n(k: int) -> int:
                return max(1, round(k * depth))

            c1, c2, c3, c4, c5 = ch(64), ch(128), ch(256), ch(512), ch(1024)
            self.stem = nn.Sequential(conv(3, c1, 3, 2), conv(c1, c2, 3, 2), C2f(c2, c2, n(3)))
            self.p3 = nn.Sequential(conv(c2, c3, 3, 2), C2f(c3, c3, n(6)))
            self.p4 = nn.Sequential(conv(c3, c4, 3, 2), C2f(c4, c4, n(6)))
            self.p5 = nn.Sequential(conv(c4, c5, 3, 2), C2f(c5, c5, n(3)), SPPF(c5, c5))
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.top4, self.top3 = C2f(c5 + c4, c4, n(3), False), C2f(c4 + c3, c3, n(3), False)
            self.down3, self.bottom4 = conv(c3, c3, 3, 2), C2f(c3 + c4, c4, n(3), False)
            self.down4, self.bottom5 = conv(c4, c4, 3, 2), C2f(c4 + c5, c5, n(3), False)
            self.reg_max, self.classes = reg_max, classes
            box_c, cls_c = max(16, c3 // 4, reg_max * 4), max(c3, min(classes, 100))
            self.box = nn.ModuleList(nn.Sequential(conv(c, box_c, 3), conv(box_c, box_c, 3), nn.Conv2d(box_c, 4 * reg_max, 1))
                                     for c in (c3, c4, c5))
            self.cls = nn.ModuleList(nn.Sequential(conv(c, cls_c, 3), conv(cls_c, cls_c, 3), nn.Conv2d(cls_c, classes, 1))
                                     for c in (c3, c4, c5))
            self.register_buffer("bins", torch.arange(reg_max, dtype=torch.float32))

        def forward(self, x):
            p3 = self.p3(self.stem(x))
            p4 = self.p4(p3)
            p5 = self.p5(p4)
            t4 = self.top4(torch.cat([self.up(p5), p4], 1))
            t3 = self.top3(torch.cat([self.up(t4), p3], 1))
            b4 = self.bottom4(torch.cat([self.down3(t3), t4], 1))
            b5 = self.bottom5(torch.cat([self.down4(b4), p5], 1))
            outs = []
            for feature, box, cls in zip((t3, b4, b5), self.box, self.cls):
                outs.append(torch.cat([box(feature), cls(feature)], 1).flatten(2))
            y = torch.cat(outs, 2)
            batch, anchors = y.shape[0], y.shape[2]
            dist = y[:, : 4 * self.reg_max].reshape(batch, 4, self.reg_max, anchors).softmax(2)
            boxes = (dist * self.bins.to(dist.dtype)[None, None, :, None]).sum(2)
            return torch.cat([boxes, y[:, 4 * self.reg_max:].sigmoid()], 1)

    return YoloV8Like


@dataclass(frozen=True)
class ModelSpec:
    make: Callable[[], Any]
    kind: str  # "vision" (one image input) or "text" (BERT inputs)
    large_batch: int
    image_size: int = 224
    vocab: int = 30522


def _torchvision(name: str) -> Callable[[], Any]:
    def make():
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return make


def _bert(**config: int) -> Callable[[], Any]:
    def make():
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig(**config))

    return make


MODELS: dict[str, ModelSpec] = {
    "resnet50": ModelSpec(_torchvision("resnet50"), "vision", 128),
    "mobilenet_v3_large": ModelSpec(_torchvision("mobilenet_v3_large"), "vision", 128),
    "efficientnet_b0": ModelSpec(_torchvision("efficientnet_b0"), "vision", 128),
    "convnext_tiny": ModelSpec(_torchvision("convnext_tiny"), "vision", 128),
    "vit_b_16": ModelSpec(_torchvision("vit_b_16"), "vision", 64),
    "yolov8s_like": ModelSpec(lambda: _yolo_classes()(width=0.5, depth=0.34), "vision", 32, image_size=640),
    "bert_base": ModelSpec(_bert(), "text", 32),  # BertConfig's defaults are BERT-base: 12 x 768, 12 heads
    "minilm": ModelSpec(_bert(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536), "text", 32),
    # For CPU dry runs and CI: the same code paths at toy sizes.
    "yolo_tiny": ModelSpec(lambda: _yolo_classes()(width=0.125, depth=0.34, classes=4), "vision", 4, image_size=64),
    "bert_tiny": ModelSpec(_bert(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=500, max_position_embeddings=SEQ), "text", 4, vocab=500),
}
DEFAULT_MODELS = ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "vit_b_16", "yolov8s_like",
                  "bert_base", "minilm"]


def model_inputs(spec: ModelSpec, batch: int, seed: int, protos: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Seeded inputs: for vision models N(0, 1) images, or with ``protos`` images of the task they were trained on."""
    rng = np.random.default_rng(seed)
    if spec.kind == "vision" and protos is not None:
        return {"x": zoo_training.task_images(protos, batch, seed)[0]}
    if spec.kind == "vision":
        return {"x": rng.standard_normal((batch, 3, spec.image_size, spec.image_size)).astype(np.float32)}
    ids = rng.integers(min(1000, spec.vocab // 2), spec.vocab, (batch, SEQ)).astype(np.int64)
    mask = np.ones((batch, SEQ), np.int64)
    mask[:, SEQ - SEQ // 8:] = 0  # some padding, so the mask matters
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((batch, SEQ), np.int64)}


def non_degenerate(module: Any, feeds: dict[str, np.ndarray]) -> Any:
    """``module`` with random weights made to give outputs an accuracy comparison can measure.

    torchvision's ``weights=None`` models start with BatchNorm statistics mean 0 / variance 1, so activations
    shrink or grow layer by layer (EfficientNet-B0's and MobileNetV3's outputs underflow fp16: rel L2 1.0 for
    every fp16 variant), and ViT's classifier head is initialised to zeros (every output 0: rel L2 0.0).
    Zero Linear weights get N(0, 0.02) and BatchNorm statistics are measured on ``feeds`` (one forward pass
    in train mode, cumulative averages), as a trained model's would be.
    """
    import torch

    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear) and not torch.any(sub.weight):
                torch.nn.init.normal_(sub.weight, std=0.02)
        norms = [sub for sub in module.modules() if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm)]
        if norms:
            momenta = [sub.momentum for sub in norms]
            for sub in norms:
                sub.reset_running_stats()
                sub.momentum = None  # a cumulative average: one pass sets the statistics of that batch
            module.train()
            module(**{name: torch.from_numpy(value) for name, value in feeds.items()})
            for sub, momentum in zip(norms, momenta):
                sub.momentum = momentum
    return module.eval()
