"""A BERT and a GPT-2 built from ``transformers`` configs (random weights: nothing is
downloaded), with token batches, as factories for the command line::

    precsearch optimize --model precsearch.examples.transformers_models:bert \
        --data precsearch.examples.transformers_models:tokens --space transformer --max-error 0.001
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB, LENGTH, BATCH = 8192, 128, 8


def bert(layers: int = 4, hidden: int = 256) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=hidden // 64, intermediate_size=4 * hidden, max_position_embeddings=512)
    return BertModel(config).eval()


def gpt2(layers: int = 4, hidden: int = 256) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=hidden // 64, n_positions=512,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tokens(batches: int = 2) -> list[dict[str, torch.Tensor]]:
    """Seeded random token ids: ``batches`` dicts of ``input_ids`` (8 x 128)."""
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)} for _ in range(batches)]
