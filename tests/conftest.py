"""Real models for the tests: a BERT and a GPT-2 from transformers configs (random weights,
nothing downloaded), a small CNN with BatchNorm, and a model with data-dependent control flow."""

from __future__ import annotations

import pytest
import torch
from torch import nn

VOCAB = 512


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


class Branchy(nn.Module):
    """Python control flow on tensor values: neither torch.export nor torch.fx can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.pos = nn.Linear(32, 32)
        self.neg = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for _ in range(int(h.abs().mean().item() * 10) % 3 + 1):
            h = self.pos(h) if h.sum() > 0 else self.neg(h)
        return self.out(h) @ self.out.weight[:, :4].T


def build_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    return BertModel(config).eval()


def build_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def build_cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN().eval()


def token_batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=generator)} for _ in range(n)]


def image_batches(n: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(n)]


MODELS = {
    "bert": (build_bert, token_batches),
    "gpt2": (build_gpt2, token_batches),
    "cnn": (build_cnn, image_batches),
}


@pytest.fixture(params=sorted(MODELS))
def real_model(request):
    """(name, model, batches) for each real model."""
    build, data = MODELS[request.param]
    return request.param, build(), data()
