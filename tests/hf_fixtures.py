"""Tiny transformers checkpoints with their own tokenizers, built with ``save_pretrained`` into a
folder: nothing is downloaded. Shared by the tests of ``hf:DIR`` checkpoints (``import hf_fixtures``).

>>> spec = save_checkpoint(tmp_path / "gpt2", "gpt2")     # doctest: +SKIP
>>> spec                                                    # doctest: +SKIP
'hf:/tmp/.../gpt2'
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "precision search finds fast plans",
             "bf16 keeps the range of fp32", "the quick brown fox jumps over the lazy dog",
             "a plan holds each layer in its dtype"]


def save_tokenizer(path: Path) -> int:
    """A word-level tokenizer trained on SENTENCES, saved as the checkpoint's own; returns its vocabulary size."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "</s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                                eos_token="</s>")
    fast.save_pretrained(path)
    return fast.vocab_size


def gpt2(vocab: int):
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=2, eos_token_id=2))


def t5(vocab: int):
    import transformers

    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=2))


def bert(vocab: int):
    import transformers

    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2))


BUILDERS = {"gpt2": gpt2, "t5": t5, "bert": bert}


def save_checkpoint(path: Path, kind: str, seed: int = 0) -> str:
    """A tiny ``kind`` checkpoint (``BUILDERS``) and its tokenizer saved in ``path``: its ``hf:DIR``."""
    vocab = save_tokenizer(path)
    torch.manual_seed(seed)
    BUILDERS[kind](vocab).save_pretrained(path)
    return f"hf:{path}"


def write_examples(path: Path, labels: bool = False) -> Path:
    """SENTENCES as a ``.jsonl`` data file (with alternating labels when asked)."""
    path.write_text("".join(json.dumps({"text": text, **({"label": i % 2} if labels else {})}) + "\n"
                            for i, text in enumerate(SENTENCES)))
    return path
