"""A checkpoint directory to try ``--model hf:DIR`` on without downloading one: a small BERT
sentiment classifier, trained for a few seconds on generated sentences, saved with
``save_pretrained`` beside its own word-level tokenizer, and an ``examples.jsonl`` of labelled
sentences it has not seen::

    python -m precsearch.examples.checkpoint walk     # writes walk/bert-sentiment/ and walk/examples.jsonl
    precsearch optimize --model hf:walk/bert-sentiment --data walk/examples.jsonl

Needs the ``hf`` extra (transformers, tokenizers).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

import torch

POSITIVE = ["great", "fine", "moving", "clever", "warm", "sharp"]
NEGATIVE = ["dull", "slow", "flat", "clumsy", "cold", "stale"]
SUBJECTS = ["the film", "the plot", "the acting", "the cast", "the score", "the ending", "the script"]
LABELS = ("negative", "positive")


def sentences(seed: int) -> list[tuple[str, int]]:
    """Every ``SUBJECT was WORD and WORD`` sentence, with 1 when both words are positive, 0 when
    both are negative, shuffled with ``seed``."""
    rows = [(f"{subject} was {first} and {second}", label)
            for label, words in enumerate((NEGATIVE, POSITIVE))
            for subject, (first, second) in itertools.product(SUBJECTS, itertools.permutations(words, 2))]
    random.Random(seed).shuffle(rows)
    return rows


def build(folder: Path, steps: int = 60) -> Path:
    """Train and save the classifier in ``folder / "bert-sentiment"``, write ``folder / "examples.jsonl"``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rows = sentences(seed=0)
    train, held = rows[: len(rows) // 2], rows[len(rows) // 2:]
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"])
    words.train_from_iterator([text for text, _ in rows], trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, max_position_embeddings=64,
        id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model.train()
    for step in range(steps):
        batch = [train[(step * 16 + i) % len(train)] for i in range(16)]
        inputs = tokenizer([text for text, _ in batch], padding=True, return_tensors="pt")
        loss = model(**inputs, labels=torch.tensor([label for _, label in batch])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    checkpoint = folder / "bert-sentiment"
    model.eval().save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    with (folder / "examples.jsonl").open("w", encoding="utf-8") as file:
        for text, label in held:
            file.write(json.dumps({"text": text, "label": LABELS[label]}) + "\n")
    return checkpoint


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m precsearch.examples.checkpoint", description=(
        "Train a small BERT sentiment classifier on generated sentences and write it, with its tokenizer, "
        "to FOLDER/bert-sentiment/, and unseen labelled sentences to FOLDER/examples.jsonl."))
    parser.add_argument("folder", nargs="?", default=".", help="where to write them (default: here)")
    target = Path(parser.parse_args().folder)
    target.mkdir(parents=True, exist_ok=True)
    print(f"wrote {build(target)} and {target / 'examples.jsonl'}")
