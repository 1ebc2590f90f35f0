"""Train a small YOLOv8-style detector (PyTorch) on the synthetic thermal scenes; export ONNX the way
ultralytics does: images [1,3,160,160] RGB in [0,1] -> output0 [1, 4+C, A] (cx, cy, w, h in input
pixels, sigmoid class scores), class names in the ONNX metadata ``names``.

Model: Conv-BN-SiLU stem, C2f stages to strides 8/16/32, SPPF, a top-down FPN, and a decoupled
anchor-free head per level (box branch predicting left/top/right/bottom distances, class branch),
as in YOLOv8 but without DFL (distances are softplus x stride). Training: a task-aligned assigner
(top 10 points inside each box by score x IoU^6), BCE on IoU-quality class targets, GIoU box loss,
AdamW with a cosine schedule, random flips. Runs on CUDA when present, else on ``--threads`` CPU threads.

    python benchmarks/detection/train_yolo.py --threads 2     # the shipped model: 6 epochs x 1200 scenes
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import synth_data

SIZE = 160
NUM_CLASSES = len(synth_data.CLASSES)
STRIDES = (8, 16, 32)
TOP_K = 10
MODELS = Path(__file__).parent / "models"


class ConvBN(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.cv2 = ConvBN(c, c), ConvBN(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8's C2f: split, a chain of bottlenecks on one half, every intermediate concatenated."""

    def __init__(self, c_in: int, c_out: int, n: int = 1):
        super().__init__()
        self.half = c_out // 2
        self.cv1 = ConvBN(c_in, 2 * self.half, 1)
        self.blocks = nn.ModuleList(Bottleneck(self.half) for _ in range(n))
        self.cv2 = ConvBN((2 + n) * self.half, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).chunk(2, 1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class SPPF(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.cv2 = ConvBN(c, c // 2, 1), ConvBN(c // 2 * 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = F.max_pool2d(x, 5, 1, 2)
        y2 = F.max_pool2d(y1, 5, 1, 2)
        return self.cv2(torch.cat([x, y1, y2, F.max_pool2d(y2, 5, 1, 2)], 1))


class YoloSynth(nn.Module):
    """images [N,3,S,S] in [0,1] -> (box distances [N,4,A] in pixels, class logits [N,C,A], points [A,2], strides [A,1])."""

    def __init__(self, classes: int = NUM_CLASSES, widths: tuple[int, int, int, int] = (16, 32, 64, 96)):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.stem = nn.Sequential(ConvBN(3, w0, 3, 2), ConvBN(w0, w1, 3, 2), C2f(w1, w1, 1))
        self.p3 = nn.Sequential(ConvBN(w1, w2, 3, 2), C2f(w2, w2, 2))
        self.p4 = nn.Sequential(ConvBN(w2, w3, 3, 2), C2f(w3, w3, 2))
        self.p5 = nn.Sequential(ConvBN(w3, w3, 3, 2), C2f(w3, w3, 1), SPPF(w3))
        self.top_down4 = C2f(2 * w3, w3, 1)
        self.top_down3 = C2f(w3 + w2, w2, 1)
        self.box_heads = nn.ModuleList(
            nn.Sequential(ConvBN(c, 32), nn.Conv2d(32, 4, 1)) for c in (w2, w3, w3))
        self.class_heads = nn.ModuleList(
            nn.Sequential(ConvBN(c, 32), nn.Conv2d(32, classes, 1)) for c in (w2, w3, w3))
        for head in self.class_heads:
            nn.init.constant_(head[-1].bias, -math.log(99.0))  # start at score 0.01: few false positives to unlearn

    def forward(self, images: torch.Tensor):
        x = self.stem(images)
        c3 = self.p3(x)
        c4 = self.p4(c3)
        c5 = self.p5(c4)
        f4 = self.top_down4(torch.cat([F.interpolate(c5, scale_factor=2.0, mode="nearest"), c4], 1))
        f3 = self.top_down3(torch.cat([F.interpolate(f4, scale_factor=2.0, mode="nearest"), c3], 1))
        distances, logits, points, strides = [], [], [], []
        for feature, stride, box_head, class_head in zip((f3, f4, c5), STRIDES, self.box_heads, self.class_heads):
            n, _, h, w = feature.shape
            distances.append((F.softplus(box_head(feature)) * stride).flatten(2))
            logits.append(class_head(feature).flatten(2))
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            points.append((torch.stack([xs.flatten(), ys.flatten()], 1).float() + 0.5) * stride)
            strides.append(torch.full((h * w, 1), float(stride)))
        return torch.cat(distances, 2), torch.cat(logits, 2), torch.cat(points), torch.cat(strides)


class UltralyticsLayout(nn.Module):
    """The exported graph: [N, 4+C, A] with cx, cy, w, h in input pixels and sigmoid class scores."""

    def __init__(self, network: YoloSynth):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        distances, logits, points, _ = self.network(images)
        points = points.T.unsqueeze(0).to(distances.dtype)  # [1, 2, A]
        top_left, bottom_right = points - distances[:, :2], points + distances[:, 2:]
        boxes = torch.cat([(top_left + bottom_right) / 2, bottom_right - top_left], 1)
        return torch.cat([boxes, logits.sigmoid()], 1)


def _xyxy(distances: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """[A,4] ltrb distances + [A,2] points -> [A,4] x1,y1,x2,y2."""
    return torch.cat([points - distances[:, :2], points + distances[:, 2:]], 1)


def _giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise (IoU, GIoU) of x1,y1,x2,y2 boxes [..., 4]."""
    inter = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter + 1e-7
    iou = inter / union
    hull = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).prod(-1) + 1e-7
    return iou, iou - (hull - union) / hull


def assign(pred_boxes: torch.Tensor, scores: torch.Tensor, points: torch.Tensor, gt: torch.Tensor, gt_classes: torch.Tensor):
    """Task-aligned assignment for one image: (assigned gt index [A] or -1, IoU-quality class target [A, C])."""
    a = len(points)
    target = torch.zeros_like(scores)
    owner = torch.full((a,), -1, dtype=torch.long)
    if len(gt) == 0:
        return owner, target
    inside = ((points[None, :, :] > gt[:, None, :2]) & (points[None, :, :] < gt[:, None, 2:])).all(-1)  # [G, A]
    iou, _ = _giou(gt[:, None, :].expand(-1, a, -1), pred_boxes[None].expand(len(gt), -1, -1))
    align = scores[:, gt_classes].T.pow(0.5) * iou.pow(6) * inside  # [G, A]
    align = align + inside * 1e-9  # ties among inside points (untrained model) fall to any of them, never outside
    top = align.topk(min(TOP_K, a), dim=1).indices
    chosen = torch.zeros_like(inside)
    chosen.scatter_(1, top, True)
    chosen &= inside
    overlap = torch.where(chosen, iou, torch.full_like(iou, -1.0))
    best_iou, best_gt = overlap.max(0)
    positive = best_iou >= 0
    owner[positive] = best_gt[positive]
    quality = iou[best_gt[positive], positive.nonzero().squeeze(1)].clamp(min=0.05)
    target[positive, gt_classes[best_gt[positive]]] = quality
    return owner, target


def detection_loss(network: YoloSynth, images: torch.Tensor, gts: list[torch.Tensor], classes: list[torch.Tensor]) -> torch.Tensor:
    distances, logits, points, _ = network(images)
    points = points.to(images.device)
    total_box, total_cls, norm = 0.0, 0.0, 0.0
    for i in range(len(images)):
        pred = _xyxy(distances[i].T, points)
        with torch.no_grad():
            owner, target = assign(pred.detach(), logits[i].T.sigmoid().detach(), points, gts[i], classes[i])
        total_cls = total_cls + F.binary_cross_entropy_with_logits(logits[i].T, target, reduction="sum")
        positive = owner >= 0
        if positive.any():
            weight = target[positive].sum(1)
            _, giou = _giou(pred[positive], gts[i][owner[positive]])
            total_box = total_box + ((1.0 - giou) * weight).sum()
            norm = norm + weight.sum()
    norm = max(float(norm), 1.0)
    return (7.5 * total_box + 0.5 * total_cls) / norm


def batches(pixels: np.ndarray, labels: list[list[synth_data.Box]], batch: int, rng: np.random.Generator):
    """Shuffled batches with random horizontal / vertical flips (every class looks like itself flipped)."""
    order = rng.permutation(len(pixels))
    for start in range(0, len(order) - batch + 1, batch):
        images, gts, classes = [], [], []
        for index in order[start : start + batch]:
            image = pixels[index].astype(np.float32) / 255.0
            boxes = np.array([[b.x1, b.y1, b.x2, b.y2] for b in labels[index]], np.float32).reshape(-1, 4)
            if rng.random() < 0.5:
                image = image[:, ::-1]
                boxes[:, [0, 2]] = SIZE - boxes[:, [2, 0]]
            if rng.random() < 0.5:
                image = image[::-1]
                boxes[:, [1, 3]] = SIZE - boxes[:, [3, 1]]
            images.append(np.repeat(image[None], 3, 0))
            gts.append(torch.from_numpy(boxes))
            classes.append(torch.tensor([b.category for b in labels[index]], dtype=torch.long))
        yield torch.from_numpy(np.ascontiguousarray(np.stack(images))), gts, classes


def export_onnx(network: YoloSynth, path: Path) -> None:
    import onnx

    network.eval()
    layout = UltralyticsLayout(network)
    temporary = path.with_suffix(".onnx.tmp")
    torch.onnx.export(layout, (torch.zeros(1, 3, SIZE, SIZE),), str(temporary), input_names=["images"],
                      output_names=["output0"], opset_version=17, dynamo=False)
    model = onnx.load(str(temporary))
    for key, value in {"names": repr(dict(enumerate(synth_data.CLASSES))), "task": "detect",
                       "imgsz": repr([SIZE, SIZE]), "stride": "32"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(temporary))
    temporary.replace(path)


def train(epochs: int, train_count: int, seed: int, batch: int, out: Path, device: str) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    pixels, labels = synth_data.scenes_in_memory(train_count, seed, SIZE)
    network = YoloSynth().to(device)
    steps = epochs * (train_count // batch)
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    loss = torch.tensor(0.0)
    for epoch in range(epochs):
        network.train()
        epoch_started, losses = time.perf_counter(), []
        for images, gts, classes in batches(pixels, labels, batch, rng):
            loss = detection_loss(network, images.to(device), [g.to(device) for g in gts], [c.to(device) for c in classes])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 10.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss))
        print(f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f} ({time.perf_counter() - epoch_started:.0f} s)", flush=True)
    seconds = time.perf_counter() - started
    network = network.cpu().eval()
    out.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), out / "yolov8_synth.pt")
    export_onnx(network, out / "yolov8_synth.onnx")
    return {"epochs": epochs, "train_images": train_count, "seed": seed, "batch": batch, "device": device,
            "train_seconds": round(seconds, 1), "final_loss": round(float(np.mean(losses)), 4),
            "params": sum(p.numel() for p in network.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train", type=int, default=1200, help="training scenes (seed --seed of synth_data)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads torch may use")
    parser.add_argument("--out", type=Path, default=MODELS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = train(args.epochs, args.train, args.seed, args.batch, args.out, device)
    (args.out / "yolo_training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
