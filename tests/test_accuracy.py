import math

import pytest
import torch

from precsearch.runtime.accuracy import Fidelity, cosine, flatten_outputs, max_abs, rel_l2, top1
from precsearch.runtime.errors import InputError


def test_flatten_outputs_walks_nested_structures_in_order():
    a, b, c = torch.ones(2), torch.zeros(3), torch.full((1,), 2.0)
    output = {"logits": a, "rest": (b, [c, torch.arange(3)]), "name": "x"}
    assert [t.shape for t in flatten_outputs(output)] == [a.shape, b.shape, c.shape]


def test_metric_definitions():
    ref = [[torch.tensor([[3.0, 4.0], [1.0, 0.0]])]]
    got = [[torch.tensor([[3.0, 4.0], [0.0, 1.0]])]]
    assert rel_l2(got, ref) == pytest.approx(math.sqrt(2) / math.sqrt(26))
    assert cosine(got, ref) == pytest.approx(1 - (1.0 + 0.0) / 2)
    assert max_abs(got, ref) == pytest.approx(1.0)
    assert top1(got, ref) == pytest.approx(0.5)
    assert rel_l2(ref, ref) == 0.0 and top1(ref, ref) == 0.0


def test_non_finite_output_is_infinitely_wrong():
    ref = [[torch.ones(4)]]
    bad = [[torch.tensor([1.0, float("inf"), 1.0, 1.0])]]
    for metric in (rel_l2, cosine, max_abs, top1):
        assert metric(bad, ref) == math.inf


def test_reference_is_computed_once_and_checked_by_a_second_run():
    calls = []
    model = torch.nn.Linear(4, 4)
    model.register_forward_hook(lambda *args: calls.append(1))
    fidelity = Fidelity.builtin(model, [torch.randn(2, 4)], "rel_l2", 0.01)
    assert len(calls) == 2          # the reference, and one run to check FP32 repeats itself
    assert fidelity.error(model) == 0.0
    assert fidelity.error(model) == 0.0
    assert len(calls) == 4


class MutatesInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        x.mul_(2.0)            # the caller's batch changes on every call
        return self.fc(x)


class ClampsInput(MutatesInput):
    def forward(self, x):
        x.clamp_(min=0.0)      # changes the batch once; every later call sees the same input
        return self.fc(x)


@pytest.mark.parametrize("model,cause", [
    (MutatesInput(), "changes its inputs in place"),
    (torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train(), "call model.eval()"),
])
def test_fp32_outputs_that_change_between_two_runs_are_bad_input(model, cause):
    torch.manual_seed(0)
    with pytest.raises(InputError, match="the FP32 model gives different outputs on two identical runs") as error:
        Fidelity.builtin(model, [torch.randn(8, 4)], "rel_l2", 0.01)
    assert cause in str(error.value) and "\n" not in str(error.value)


def test_an_idempotent_input_change_and_tiny_run_to_run_noise_are_accepted():
    torch.manual_seed(0)
    model = ClampsInput()
    assert Fidelity.builtin(model, [torch.randn(8, 4)], "rel_l2", 0.01).error(model) == 0.0
    from precsearch.runtime.accuracy import check_repeatable

    check_repeatable(1e-7, "rel_l2", 0.01, inputs_changed=False)   # rounding of atomic reductions
    with pytest.raises(InputError, match="rel_l2 0.002 between them"):
        check_repeatable(0.002, "rel_l2", 0.01, inputs_changed=False)
    check_repeatable(1e-9, "max_abs", 0.0, inputs_changed=False)      # a zero limit still allows rounding
    with pytest.raises(InputError, match="changes its inputs in place"):
        check_repeatable(1e-4, "max_abs", 0.0, inputs_changed=True)
    with pytest.raises(InputError):
        check_repeatable(math.nan, "rel_l2", 0.01, inputs_changed=False)


def test_outputs_with_no_elements_are_bad_input():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(InputError, match="outputs on --data are empty"):
        Fidelity.builtin(model, [torch.zeros(0, 4)], "rel_l2", 0.01)


def test_user_metric_drop_against_fp32():
    model = torch.nn.Linear(4, 2)
    scores = iter([0.90, 0.88, 0.80])
    fidelity = Fidelity.user(model, [torch.randn(2, 4)], lambda m, b: next(scores), "acc", max_drop=0.05)
    assert fidelity.reference_value == 0.90
    assert fidelity.error(model) == pytest.approx(0.02)
    assert fidelity.error(model) == pytest.approx(0.10)
    relative = Fidelity.user(model, [torch.randn(2, 4)], lambda m, b: 0.5, "acc", max_rel_drop=0.1)
    assert relative.error(model) == 0.0


@pytest.mark.parametrize("kwargs,message", [
    ({}, "exactly one of --max-drop or --max-rel-drop"),
    ({"max_drop": 0.1, "max_rel_drop": 0.1}, "exactly one"),
    ({"max_drop": -1.0}, "--max-drop -1.0: must be a finite number >= 0"),
])
def test_user_metric_needs_one_drop_limit(kwargs, message):
    with pytest.raises(InputError, match=message):
        Fidelity.user(torch.nn.Linear(2, 2), [torch.randn(1, 2)], lambda m, b: 1.0, "acc", **kwargs)


def test_unknown_metric_and_bad_limit():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(InputError, match="unknown metric"):
        Fidelity.builtin(model, [torch.randn(1, 2)], "psnr", 0.01)
    with pytest.raises(InputError, match="--max-error nan"):
        Fidelity.builtin(model, [torch.randn(1, 2)], "rel_l2", float("nan"))


def test_task_metrics_read_the_batches():
    from precsearch.runtime.accuracy import METRICS, embedding_cosine, perplexity

    batch = {"input_ids": torch.tensor([[0, 1, 1]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    logits = torch.log_softmax(torch.tensor([[[0.0, 2.0], [1.0, 0.0], [5.0, -5.0]]]), -1)
    assert perplexity([[logits]], [[logits]], [batch]) == 0.0
    worse = logits.clone()
    worse[0, 0] = torch.tensor([0.0, 0.0]).log_softmax(-1)
    assert perplexity([[worse]], [[logits]], [batch]) > 0
    padded = logits.clone()
    padded[0, 2] = torch.tensor([-5.0, 5.0])  # a padded position changes no embedding
    assert embedding_cosine([[padded]], [[logits]], [batch]) == pytest.approx(0.0, abs=1e-12)
    assert METRICS["perplexity"].uses_batches and not METRICS["rel_l2"].uses_batches


def test_perplexity_needs_token_batches():
    from precsearch.runtime.accuracy import perplexity

    with pytest.raises(InputError, match="input_ids"):
        perplexity([[torch.ones(1, 2, 3)]], [[torch.ones(1, 2, 3)]], [torch.ones(1, 2)])


def test_the_task_decides_the_default_metric():
    from precsearch.runtime.accuracy import task_metric

    assert task_metric("causal-lm", []) == "perplexity"
    assert task_metric("sequence-classification", [{"input_ids": torch.ones(1, 2)}]) == "top1"
    assert task_metric(None, []) == "rel_l2" and task_metric("unknown", []) == "rel_l2"
