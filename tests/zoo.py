"""A model zoo for the tests: tiny configs of real architectures (random weights, nothing
downloaded), each with one batch of inputs."""

from __future__ import annotations

import torch
from torch import nn

VOCAB, SEQ, BATCH = 128, 8, 2


def _ids(generator: torch.Generator) -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)


def _text(config_cls, model_cls, **fields):
    def build():
        config = config_cls(vocab_size=VOCAB, **fields)
        return model_cls(config)
    return build, lambda g: {"input_ids": _ids(g)}


def _encoder(name: str):
    import transformers as t

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64)
    return {
        "bert": _text(t.BertConfig, t.BertModel, **small),
        "roberta": _text(t.RobertaConfig, t.RobertaModel, **small, pad_token_id=1),
        "distilbert": _text(t.DistilBertConfig, t.DistilBertModel, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                            max_position_embeddings=64),
        "albert": _text(t.AlbertConfig, t.AlbertModel, embedding_size=16, **small),
        "electra": _text(t.ElectraConfig, t.ElectraModel, embedding_size=16, **small),
        "deberta-v2": _text(t.DebertaV2Config, t.DebertaV2Model, **small),
    }[name]


def _decoder(name: str):
    import transformers as t

    llama = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=64)
    return {
        "gpt2": _text(t.GPT2Config, t.GPT2LMHeadModel, n_embd=32, n_layer=2, n_head=2, n_positions=64),
        "gpt-neo": _text(t.GPTNeoConfig, t.GPTNeoForCausalLM, hidden_size=32, num_layers=2, num_heads=2,
                         attention_types=[[["global", "local"], 1]], max_position_embeddings=64, window_size=4),
        "llama": _text(t.LlamaConfig, t.LlamaForCausalLM, **llama),
        "mistral": _text(t.MistralConfig, t.MistralForCausalLM, **llama),
        "qwen2": _text(t.Qwen2Config, t.Qwen2ForCausalLM, **llama),
        "phi": _text(t.PhiConfig, t.PhiForCausalLM, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64),
        "gemma": _text(t.GemmaConfig, t.GemmaForCausalLM, head_dim=8, **llama),
    }[name]


def _seq2seq(name: str):
    import transformers as t

    def t5():
        config = t.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            decoder_start_token_id=0)
        return t.T5Model(config)

    def bart():
        config = t.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                              decoder_ffn_dim=64, max_position_embeddings=64)
        return t.BartModel(config)

    def whisper():
        config = t.WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                 encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                 decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16,
                                 max_target_positions=16, pad_token_id=0, decoder_start_token_id=1)
        return t.WhisperModel(config)

    pair = lambda g: {"input_ids": _ids(g), "decoder_input_ids": _ids(g)}  # noqa: E731
    return {
        "t5": (t5, pair),
        "bart": (bart, pair),
        "whisper": (whisper, lambda g: {"input_features": torch.randn(BATCH, 16, 32, generator=g),
                                        "decoder_input_ids": _ids(g)}),
    }[name]


def _vision(name: str):
    import transformers as t

    image = lambda size: lambda g: {"pixel_values": torch.randn(BATCH, 3, size, size, generator=g)}  # noqa: E731
    return {
        "vit": (lambda: t.ViTModel(t.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, image_size=16, patch_size=4)), image(16)),
        "convnext": (lambda: t.ConvNextModel(t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                              image_size=32)), image(32)),
        "resnet": (lambda: t.ResNetModel(t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                        layer_type="basic")), image(32)),
        "swin": (lambda: t.SwinModel(t.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                  num_heads=[2, 2], window_size=4)), image(32)),
        "clip": (lambda: t.CLIPModel(t.CLIPConfig(
            text_config={"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "intermediate_size": 64, "max_position_embeddings": 16},
            vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 64, "image_size": 16, "patch_size": 4}, projection_dim=16)),
                 lambda g: {"input_ids": _ids(g), "pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g)}),
    }[name]


class EncoderLayers(nn.Module):
    """``nn.TransformerEncoder`` in eval: torch runs its fused fast path."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(32, 2, batch_first=True)
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attention(x, x, x, need_weights=False)[0])


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, 32, batch_first=True)
        self.gru = nn.GRU(32, 32, batch_first=True)
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gru(self.lstm(x)[0])[0])


class Branching(nn.Module):
    """Data-dependent control flow: only hooks can walk it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.pos, self.neg, self.out = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = self.pos(h) if h.sum() > 0 else self.neg(h)
        return self.out(h)


def _plain(name: str):
    tokens = lambda g: torch.randn(BATCH, SEQ, 32, generator=g)  # noqa: E731
    return {"transformer-encoder-layer": (EncoderLayers, tokens), "multihead-attention": (Attention, tokens),
            "lstm-gru": (Recurrent, tokens), "control-flow": (Branching, tokens)}[name]


FAMILIES = {
    "encoder": (["bert", "roberta", "distilbert", "albert", "electra", "deberta-v2"], _encoder),
    "decoder": (["gpt2", "gpt-neo", "llama", "mistral", "qwen2", "phi", "gemma"], _decoder),
    "seq2seq": (["t5", "bart", "whisper"], _seq2seq),
    "vision": (["vit", "convnext", "resnet", "swin", "clip"], _vision),
    "torch": (["transformer-encoder-layer", "multihead-attention", "lstm-gru", "control-flow"], _plain),
}
NAMES = [name for names, _ in FAMILIES.values() for name in names]


def build(name: str) -> tuple[nn.Module, object]:
    """The model (eval, seeded) and one batch."""
    lookup = next(factory for names, factory in FAMILIES.values() if name in names)
    make, data = lookup(name)
    torch.manual_seed(0)
    model = make().eval()
    return model, data(torch.Generator().manual_seed(1))


# Factories for the command line (``--model zoo:llama --data zoo:llama_data``).
def llama():
    return build("llama")[0]


def llama_data():
    return [build("llama")[1]]


def t5():
    return build("t5")[0]


def t5_data():
    return [build("t5")[1]]


def vit():
    return build("vit")[0]


def vit_data():
    return [build("vit")[1]]
