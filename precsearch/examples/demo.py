"""The built-in demo: a residual MLP with two precision traps, and generated data.

``amplify`` produces values around 1e5, past FP16's largest finite value (65504): in FP16 the
model outputs inf. ``shift`` adds a common offset of 12 that the following LayerNorm removes:
BF16's 8-bit mantissa rounds away most of the signal riding on it, FP16 keeps it. Every other
unit is safe in either half precision. Used by ``precsearch layers|check|optimize`` when no
``--model`` is given::

    precsearch layers --model precsearch.examples.demo:model --data precsearch.examples.demo:data
"""

from __future__ import annotations

import torch
from torch import nn

WIDTH, HIDDEN, FEATURES, CLASSES = 512, 1024, 64, 10


class Block(nn.Module):
    """Pre-norm residual MLP block."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class TrapNet(nn.Module):
    """stem -> block 0 -> amplify (+ norm, residual) -> middle blocks -> shift (+ norm) -> last block -> head."""

    def __init__(self, width: int = WIDTH, hidden: int = HIDDEN, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(FEATURES, width)
        self.blocks = nn.ModuleList(Block(width, hidden) for _ in range(blocks))
        self.amplify = nn.Linear(width, width)   # FP16 trap: outputs ~1e5 overflow FP16
        self.amplify_norm = nn.LayerNorm(width)
        self.shift = nn.Linear(width, width)     # BF16 trap: signal on a large common offset
        self.shift_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, CLASSES)
        with torch.no_grad():
            self.amplify.weight.mul_(2e5)
            self.shift.bias.fill_(12.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *middle = self.blocks
        last = middle.pop() if middle else None
        h = first(self.stem(x))
        h = h + self.amplify_norm(self.amplify(h))
        for block in middle:
            h = block(h)
        h = self.shift_norm(self.shift(h))
        h = last(h) if last is not None else h
        return self.head(h)


def model(seed: int = 0, blocks: int = 3) -> TrapNet:
    """The demo model with seeded random weights, in eval mode (10 units with 3 blocks)."""
    torch.manual_seed(seed)
    return TrapNet(blocks=blocks).eval()


def small_model(seed: int = 0) -> TrapNet:
    """The same traps with one block: 6 units, 729 plans, small enough for exhaustive search."""
    return model(seed, blocks=1)


def data(batches: int = 4, batch_size: int = 256, seed: int = 1) -> list[torch.Tensor]:
    """Seeded standard-normal inputs: ``batches`` tensors of shape (batch_size, 64)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, FEATURES, generator=generator) for _ in range(batches)]


def training_data(batches: int = 4, batch_size: int = 256, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(inputs, target)`` pairs for training mode; the targets are a fixed random labelling."""
    generator = torch.Generator().manual_seed(seed + 1)
    return [(x, torch.randint(0, CLASSES, (x.shape[0],), generator=generator)) for x in data(batches, batch_size, seed)]
