"""A real task: an MLP trained on scikit-learn's handwritten digits (shipped with the package,
nothing downloaded), with its test accuracy as a user metric::

    precsearch optimize --model precsearch.examples.digits:model --data precsearch.examples.digits:data \\
        --metric precsearch.examples.digits:accuracy --max-drop 0.005
"""

from __future__ import annotations

import functools
from typing import TypeVar

import torch
from torch import nn

HIDDEN = 512


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.fc3(x))
        return self.out(x)


@functools.lru_cache(maxsize=1)
def _split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/test split of the 1797 digits, features scaled to [0, 1], seeded."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, train = order[:512], order[512:]
    return features[train], labels[train], features[test], labels[test]


def training_data(batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(inputs, target)`` batches of the training split."""
    x, y, _, _ = _split()
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


_Model = TypeVar("_Model", bound=nn.Module)


def train(model: _Model, epochs: int = 8, seed: int = 0) -> _Model:
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for inputs, target in training_data():
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), target).backward()
            optimizer.step()
    return model.eval()


def model(seed: int = 0) -> DigitsMLP:
    """A DigitsMLP trained for a few epochs (about a second on 2 cores)."""
    torch.manual_seed(seed)
    return train(DigitsMLP(), seed=seed)


def data(batch_size: int = 256) -> list[torch.Tensor]:
    """The test split's inputs, in batches (the labels stay with ``accuracy``)."""
    _, _, x, _ = _split()
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def accuracy(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Test accuracy: the fraction of the test split classified right."""
    _, _, _, labels = _split()
    predictions = torch.cat([model(batch).argmax(-1) for batch in batches])
    return float((predictions == labels[: len(predictions)]).float().mean())
