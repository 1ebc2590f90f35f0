"""A short training run that gives the GPU zoo's convolutional models trained-like weights (issue 15).

With seeded random weights ResNet-50 is chaotic: fp16's rounding grows through its residual blocks to a rel L2
of 3e-2 against fp32 for every fp16 variant, eager included, so the zoo's accuracy figure measured the weights,
not the engines. Trained networks are not chaotic, but none can be downloaded on the GPU machine. So the
vision models are trained for a few hundred steps on a synthetic task: ten smooth random prototype images,
each a class, seen through Gaussian noise; the model learns to tell them apart (logits 0-9 of the classifier;
for the YOLOv8-like detector, its class probabilities averaged over the anchors). The accuracy rows then use
held-out images of the same task, as a trained model is measured on its own kind of data.

On the CPU (a torchvision-style ResNet-50 at 64x64, 100 AdamW steps of batch 32, to 100% accuracy), the
fp16 rel L2 of the logits against fp32 went from 6.3e-2 with random weights to 8.9e-4 trained
(results/zoo_training_cpu_resnet50.json, from ``python benchmarks/zoo_training.py [--size 64] [--steps 100]
[--json FILE]``, about 4 minutes on 2 cores).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = 10
NOISE = 0.5


def prototypes(image_size: int, seed: int = 1) -> np.ndarray:
    """CLASSES smooth random images [CLASSES, 3, size, size] (8x8 noise upsampled bilinearly)."""
    import torch

    coarse = torch.randn(CLASSES, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    smooth = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return smooth.numpy().astype(np.float32)


def task_images(protos: np.ndarray, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch of the task: each image a prototype plus N(0, NOISE^2) noise; returns (images, labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(protos), batch)
    images = protos[labels] + NOISE * rng.standard_normal((batch,) + protos.shape[1:]).astype(np.float32)
    return images.astype(np.float32), labels


def class_scores(output: Any, classes: int) -> Any:
    """The task's logits from a model's first output: a classifier's [N, classes] logits, or a detector's
    [N, 4 + classes, anchors] probabilities averaged over the anchors (as logits)."""
    import torch

    if output.dim() == 2:
        return output[:, :classes]
    probabilities = output[:, 4:4 + classes].float().mean(2).clamp(1e-6, 1 - 1e-6)
    return torch.log(probabilities) - torch.log1p(-probabilities)


def task_classes(output: Any) -> int:
    """How many of the task's classes the model can tell apart (a toy detector may have fewer than CLASSES)."""
    return min(CLASSES, output.shape[1] if output.dim() == 2 else output.shape[1] - 4)


def train_briefly(module: Any, protos: np.ndarray, steps: int, device: str, batch: int = 32, lr: float = 1e-3,
                  first_output=lambda result: result) -> dict[str, Any]:
    """Train ``module`` in place for ``steps`` AdamW steps on the prototype task (bf16 autocast on a GPU; BatchNorm
    statistics recomputed afterwards, see :func:`recalibrate_batch_norm`); returns what happened: the classes used
    (the first ``classes`` prototypes), steps, seconds, last loss, held-out accuracy."""
    import torch

    module.to(device).eval()
    with torch.no_grad():
        classes = task_classes(first_output(module(torch.from_numpy(protos[:2]).to(device))))
    protos = protos[:classes]
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
    # The training batches are drawn on the device and the forward pass runs under bf16 autocast on a GPU: with
    # numpy noise and fp32 the YOLOv8-like detector at 640x640 took 302 s for 300 steps on the H200, most of it
    # drawing the batches on the host (39M normal samples a step: 0.98 s a batch with task_images on the 2-core VM).
    on_gpu = torch.device(device).type == "cuda"
    device_protos = torch.from_numpy(protos).to(device)
    generator = torch.Generator(device=device).manual_seed(10_000)

    def draw_batch():
        labels = torch.randint(0, classes, (batch,), generator=generator, device=device)
        noise = torch.randn((batch,) + tuple(device_protos.shape[1:]), generator=generator, device=device)
        return device_protos[labels] + NOISE * noise, labels

    started = time.perf_counter()
    loss_value = float("nan")
    for _ in range(steps):
        images, labels = draw_batch()
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=on_gpu):
            scores = class_scores(first_output(module(images)), classes)
        loss = torch.nn.functional.cross_entropy(scores.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
    recalibrate_batch_norm(module, lambda: draw_batch()[0])
    module.eval()
    images, labels = task_images(protos, 256, seed=5)
    with torch.no_grad():
        predicted = class_scores(first_output(module(torch.from_numpy(images).to(device))), classes).argmax(1).cpu().numpy()
    module.cpu()
    return {"classes": classes, "steps": steps, "batch": batch, "lr": lr, "autocast": "bf16" if on_gpu else None,
            "seconds": round(time.perf_counter() - started, 1),
            "last_loss": round(loss_value, 4), "held_out_accuracy": float(np.mean(predicted == labels)),
            "task": f"{classes} smooth random prototypes + N(0, {NOISE}^2) noise"}


def recalibrate_batch_norm(module: Any, draw: Any, batches: int = 20) -> None:
    """BatchNorm running statistics recomputed as plain averages over ``batches`` fresh training batches.

    After a few hundred steps, layers with a small momentum (torchvision's MobileNetV3 and EfficientNet use
    0.01) still hold statistics mostly from the random initialisation: the network scores near chance in eval
    mode while its training loss is near zero (MobileNetV3-Large: 8.6% held-out after 300 steps on the H200).
    """
    import torch

    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    module.train()
    with torch.no_grad():
        for _ in range(batches):
            module(draw())
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


# --------------------------------------------------------------------------- the CPU check quoted above


def resnet50_layout(classes: int = 1000) -> Any:
    """torchvision's ResNet-50 layout and init (bottlenecks 3-4-6-3, stride on the 3x3), for machines without
    torchvision (this project's CPU venv: the PyPI torchvision wheel does not load with its CPU torch)."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int):
            super().__init__()
            self.branch = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width * 4, 1, bias=False), nn.BatchNorm2d(width * 4))
            self.down = None if stride == 1 and cin == width * 4 else nn.Sequential(
                nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4))

        def forward(self, x):
            return torch.relu(self.branch(x) + (x if self.down is None else self.down(x)))

    class Net(nn.Sequential):
        def forward(self, x):  # named like torchvision's, so ``module(x=...)`` works
            return super().forward(x)

    blocks, cin = [], 64
    for width, count, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for index in range(count):
            blocks.append(Bottleneck(cin, width, stride if index == 0 else 1))
            cin = width * 4
    model = Net(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, classes))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model


def fp16_rel_l2(module: Any, images: np.ndarray) -> float:
    """Relative L2 of the module's fp16 outputs against its fp32 outputs (on the CPU)."""
    import copy

    import torch

    x = torch.from_numpy(images)
    with torch.no_grad():
        want = module.eval()(x)
        got = copy.deepcopy(module).half()(x.half()).float()
    return float((got - want).norm() / want.norm())


def main() -> None:
    import argparse
    import json
    import sys

    import torch

    parser = argparse.ArgumentParser(description="fp16 vs fp32 of a ResNet-50 with random and briefly trained weights")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_zoo_models import non_degenerate

    torch.manual_seed(0)
    protos = prototypes(args.size)
    held_out = task_images(protos, 16, seed=9)[0]
    model = non_degenerate(resnet50_layout(), {"x": task_images(protos, 8, seed=5)[0]})
    random_weights = fp16_rel_l2(model, held_out)
    training = train_briefly(model, protos, args.steps, "cpu")
    result = {"image_size": args.size, "fp16_rel_l2_random_weights": random_weights,
              "fp16_rel_l2_trained": fp16_rel_l2(model, held_out), "training": training, "torch": torch.__version__}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
