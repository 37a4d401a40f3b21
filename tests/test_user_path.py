"""A plan applied the README's way (no ``example_inputs``) keeps its promise in the user's own
code: one call runs the model once, every unit gets its dtype whatever calls it, and the
weights held low follow what the user does to the model."""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch
import zoo
from conftest import build_cnn, build_gpt2, image_batches, token_batches
from test_zoo import DtypeWitness
from torch import nn

from precsearch import Plan, PlanError, apply_plan, audit, load_plan
from precsearch.runtime.plan import Runtime

LOW = Plan(default="bf16")


def _cast_per_call(plan: Plan) -> Plan:
    """The same plan with FP32 weights, which autocast casts on every call."""
    return dataclasses.replace(plan, runtime=Runtime(weights="fp32"))


CAST_PER_CALL = _cast_per_call(LOW)


class Stateful(nn.Module):
    """A call counter, an in-place buffer step, dropout and a train-mode BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.norm = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(32, 4)
        self.register_buffer("steps", torch.zeros(()))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.steps.add_(1)
        return self.out(self.drop(torch.relu(self.norm(self.inp(x)))))


def _stateful() -> tuple[Stateful, torch.Tensor]:
    torch.manual_seed(0)
    return Stateful().train(), torch.randn(8, 16, generator=torch.Generator().manual_seed(1))


def _seeded_call(model: nn.Module, plan: Plan, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(7)
    with apply_plan(model, plan), torch.no_grad():
        return model(x)


def test_the_first_call_runs_the_model_once():
    model, x = _stateful()
    fired = []
    model.register_forward_hook(lambda module, args, output: fired.append(1))
    with apply_plan(model, LOW), torch.no_grad():
        model(x)
        assert fired == [1] and model.calls == 1 and model.steps.item() == 1
        assert model.norm.num_batches_tracked.item() == 1
        assert model.inp.weight.dtype == torch.bfloat16  # the first call learnt which weights to hold low


def test_dropout_draws_as_with_fp32_weights():
    model, x = _stateful()
    twin = copy.deepcopy(model)
    assert torch.equal(_seeded_call(model, LOW, x), _seeded_call(twin, CAST_PER_CALL, x))


def test_applying_with_example_inputs_changes_nothing_in_the_model():
    model, x = _stateful()
    fired = []
    model.register_forward_hook(lambda module, args, output: fired.append(1))
    mean = model.norm.running_mean.clone()
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    with apply_plan(model, LOW, example_inputs=x) as handle:
        assert handle.weights.held and model.inp.weight.dtype == torch.bfloat16
        assert torch.equal(torch.rand(1), expected)           # no random number drawn
    assert not fired and model.calls == 0 and model.steps.item() == 0
    assert torch.equal(model.norm.running_mean, mean) and model.norm.num_batches_tracked.item() == 0


def test_a_dynamic_cache_holds_the_prefill_once():
    from transformers import DynamicCache

    model, batch = build_gpt2(), token_batches(1)[0]
    cache = DynamicCache()
    with apply_plan(model, Plan(default="fp32", layers={"transformer.h.0.mlp.c_fc": "bf16"})), torch.no_grad():
        model(**batch, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == batch["input_ids"].shape[1]


def _generators():
    import transformers as t

    def seq2seq(config_cls, model_cls, **fields):
        def build():
            return model_cls(config_cls(vocab_size=zoo.VOCAB, decoder_start_token_id=0, **fields)).eval()
        return build

    return {
        "gpt2": lambda: zoo.build("gpt2")[0],
        "llama": lambda: zoo.build("llama")[0],
        "t5": seq2seq(t.T5Config, t.T5ForConditionalGeneration, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                      num_heads=4),
        "bart": seq2seq(t.BartConfig, t.BartForConditionalGeneration, d_model=32, encoder_layers=2,
                        decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=64),
    }


def _generate(model: nn.Module, plan: Plan, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with apply_plan(model, plan):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, list(out.scores)


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5", "bart"])
def test_generate_gives_the_tokens_and_scores_of_fp32_weights(name):
    torch.manual_seed(0)
    model = _generators()[name]()
    mlps = {n: "bf16" for n, _ in model.named_modules() if n.endswith(("mlp", "DenseReluDense", "fc1", "fc2"))}
    assert len(mlps) >= 2
    plan = Plan(default="fp32", layers=mlps)
    ids = torch.randint(3, zoo.VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    held, held_scores = _generate(model, plan, ids)
    cast, cast_scores = _generate(model, _cast_per_call(plan), ids)
    assert torch.equal(held, cast)
    assert all(torch.equal(a, b) for a, b in zip(held_scores, cast_scores))


class RootMatmul(nn.Module):
    """The root owns an op (``x @ self.proj``) and calls the layers of a ModuleList itself."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(16, 16) / 4)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.proj
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def test_units_in_a_container_that_is_never_called_get_their_dtype():
    torch.manual_seed(0)
    model, x = RootMatmul().eval(), torch.randn(4, 16)
    plan = Plan(default="fp32", layers={"": "bf16"})
    with apply_plan(model, plan):
        witness = DtypeWitness(model)
        with witness, torch.no_grad():
            model(x)
        witness.remove()
    ran = {(unit, dtype) for unit, _, dtype in witness.seen}
    assert ran == {("", "bf16"), *((f"layers.{i}", "fp32") for i in range(4))}
    assert audit(model, plan, [x]).ok


def test_a_search_measures_the_plan_it_records_on_a_root_that_skips_its_container():
    from precsearch.runtime.accuracy import Fidelity
    from precsearch.search.evaluate import Evaluator

    torch.manual_seed(0)
    model, x = RootMatmul().eval(), torch.randn(4, 16)
    evaluator = Evaluator(model, [x], Fidelity.builtin(model, [x], "rel_l2", 1.0), "cpu")
    root_only = evaluator.error({"": "bf16", **{f"layers.{i}": "fp32" for i in range(4)}})
    all_low = evaluator.error({"": "bf16", **{f"layers.{i}": "bf16" for i in range(4)}})
    assert 0 < root_only < all_low


def test_load_state_dict_lands_in_the_fp32_weights_and_remove_returns_it():
    model, batch = build_cnn(), image_batches(1)[0]
    checkpoint = {key: value + 0.01 if value.is_floating_point() else value
                  for key, value in copy.deepcopy(model).state_dict().items()}
    with apply_plan(model, LOW), torch.no_grad():
        model(batch)
        assert all(value.dtype == torch.float32 for value in model.state_dict().values() if value.is_floating_point())
        model.load_state_dict(checkpoint)
        loaded = model(batch)
        assert model.conv1.weight.dtype == torch.bfloat16
    assert all(torch.equal(model.state_dict()[key], value) for key, value in checkpoint.items())
    fresh = build_cnn()
    fresh.load_state_dict(checkpoint)
    with apply_plan(fresh, CAST_PER_CALL), torch.no_grad():
        assert torch.equal(fresh(batch), loaded)


def test_conversions_while_applied_keep_the_model_whole():
    model, batch = build_cnn(), image_batches(1)[0]
    with apply_plan(model, LOW), torch.no_grad():
        model(batch)
        with pytest.raises(PlanError, match="float64"):
            model.double()
        model.to("cpu", torch.float32)
        assert model.conv1.weight.dtype == torch.bfloat16
        model(batch)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model.double()
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_float64_models_are_refused_for_low_units_and_run_in_fp32_plans():
    model, batch = build_cnn().double(), image_batches(1)[0].double()
    with pytest.raises(PlanError, match="float64.*model.float"):
        apply_plan(model, LOW)
    with apply_plan(model, Plan(default="fp32")), torch.no_grad():
        assert model(batch).dtype == torch.float64


def test_fine_tuning_under_an_inference_plan_moves_the_weights():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), torch.randn(8, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model[0].weight.detach().clone()
    with apply_plan(model, LOW):
        for _ in range(2):
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            after_training = model(x)          # the low copies re-cast from the stepped weights
    assert not torch.equal(model[0].weight, before)
    with apply_plan(model, CAST_PER_CALL), torch.no_grad():
        assert torch.equal(model(x), after_training)


def test_materialize_before_the_first_call_frees_the_fp32_weights_after_it():
    model, batch = build_cnn(), image_batches(1)[0]
    original = weakref.ref(model.conv1.weight)
    handle = apply_plan(model, LOW).materialize()
    with torch.no_grad():
        model(batch)
    gc.collect()
    assert original() is None and model.conv1.weight.dtype == torch.bfloat16 and handle.materialized


def test_a_first_call_that_raises_learns_on_the_next():
    model, batch = build_cnn(), image_batches(1)[0]
    with apply_plan(model, LOW) as handle, torch.no_grad():
        with pytest.raises(RuntimeError):
            model(batch[:, :1])   # one channel for three
        assert handle.weights is None
        model(batch)
        assert handle.weights.held and model.conv1.weight.dtype == torch.bfloat16


class ReadsDtype(nn.Module):
    """A parent that casts its input to a child's weight dtype (a transformers idiom)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(x.to(self.inner.weight.dtype)) * 100))


def test_a_weight_whose_dtype_the_model_reads_stays_fp32_and_outputs_are_identical():
    torch.manual_seed(0)
    model, x = ReadsDtype().eval(), torch.randn(4, 16)
    plan = Plan(default="fp32", layers={"inner": "bf16"})
    with apply_plan(model, plan), torch.no_grad():
        model(x)
        held = model(x)
        assert model.inner.weight.dtype == torch.float32
    with apply_plan(model, _cast_per_call(plan)), torch.no_grad():
        assert torch.equal(model(x), held)


def test_an_edit_to_a_held_weight_survives_remove():
    model, batch = build_cnn(), image_batches(1)[0]
    with apply_plan(model, LOW), torch.no_grad():
        model(batch)
        model.fc.weight.zero_()
        replacement = nn.Parameter(torch.ones_like(model.fc.bias, dtype=torch.float32))
        model.fc.bias = replacement
    assert model.fc.weight.dtype == torch.float32 and not model.fc.weight.any()
    assert model.fc.bias is replacement


def test_a_plan_that_splits_a_tie_is_refused_naming_both_units(tmp_path):
    model = build_cnn()
    plan = Plan(default="bf16", layers={"conv1": "fp32"}, ties={"conv1": "conv2"})
    path = tmp_path / "plan.yaml"
    plan.save(path)
    assert load_plan(path).ties == {"conv1": "conv2"}
    with pytest.raises(PlanError, match="ties: 'conv1' must share the precision of 'conv2'"):
        apply_plan(model, load_plan(path))
    with pytest.raises(PlanError, match="ties.conv9: the model has no module of that name"):
        apply_plan(model, Plan(ties={"conv9": "conv2"}))
    with pytest.raises(PlanError, match="ties.conv1: the model has no module 'conv8'"):
        apply_plan(model, Plan(ties={"conv1": "conv8"}))
    apply_plan(model, Plan(default="bf16", ties={"conv1": "conv2"})).remove()


def test_a_seq2seq_generate_runs_its_encoder_past_the_root_in_the_plans_dtype():
    # transformers' generate calls model.get_encoder()(...), not model(...): with the weights held
    # low, the encoder ran outside the plan's autocast and crashed on a dtype mismatch.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=96, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)).eval()
    ids = torch.randint(2, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", torch.bfloat16):   # the same rounding (tables FP32), with FP32 weights cast per call
        expected = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    example = {"input_ids": ids, "decoder_input_ids": ids[:, :2]}
    with apply_plan(model, Plan(default="bf16", storage_default="fp32"), example_inputs=example):
        assert model.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.bfloat16   # held low
        seen = []
        hook = model.encoder.block[0].layer[0].SelfAttention.q.register_forward_hook(
            lambda module, args, output: seen.append(output.dtype))
        model.get_encoder()(input_ids=ids)
        hook.remove()
        assert seen == [torch.bfloat16]
        assert torch.equal(model.generate(input_ids=ids, max_new_tokens=6, do_sample=False), expected)


def test_the_checkpoint_example_answers_help_without_writing_anything(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "precsearch.examples.checkpoint", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "FOLDER/bert-sentiment/" in " ".join(done.stdout.split()), done.stderr
    assert not list(tmp_path.iterdir())
