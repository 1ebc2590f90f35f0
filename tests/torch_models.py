"""Tiny PyTorch modules shaped like real architectures, for the PyTorch backend's tests and benchmarks dry run."""

from __future__ import annotations

import torch
from torch import nn


class MeanHead(nn.Module):
    """Conv -> ReLU -> global average pool written as .mean((2, 3)) -> Linear (ReduceMean at opset 18)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class SelfAttention(nn.Module):
    """nn.MultiheadAttention (torch.onnx writes Reshape allowzero=1 for its views)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


class TinyEncoder(nn.Module):
    """A BERT-like encoder layer in plain torch: embeddings, masked attention, LayerNorm, GELU, a dict out."""

    def __init__(self, vocab: int = 50, width: int = 16, heads: int = 2, max_len: int = 64) -> None:
        super().__init__()
        self.heads, self.width = heads, width
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(max_len, width) * 0.1)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, length = input_ids.shape
        h = self.embed(input_ids) + self.position[:length]
        q, k, v = self.qkv(h).view(batch, length, 3, self.heads, self.width // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (self.width // self.heads) ** 0.5
        scores = scores + (1.0 - attention_mask[:, None, None, :].float()) * -1e4
        attended = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(batch, length, self.width)
        h = self.norm1(h + self.proj(attended))
        h = self.norm2(h + self.down(nn.functional.gelu(self.up(h))))
        return {"last_hidden_state": h, "pooler_output": torch.tanh(h[:, 0])}


class StridedPoolNet(nn.Module):
    """Four stride-2 convolutions then a 2x2 max pool: needs H, W >= 32 * 2 (at 32 the pool sees a 1x1 map)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in (8, 8, 16, 16, 16):
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).amax((2, 3)))


def onnx_of(module: nn.Module, args: tuple, dynamic: tuple, opset: int = 18):
    """The module exported the way torch.onnx's dynamo exporter writes it today."""
    program = torch.export.export(module.eval(), args, dynamic_shapes=dynamic)
    return torch.onnx.export(program, (), dynamo=True, opset_version=opset, optimize=True, verbose=False).model_proto
