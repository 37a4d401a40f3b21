"""Batches as the CLI contract defines them: a Tensor, positional inputs, or keyword inputs."""

import pytest
import torch
from torch import nn

from precsearch.runtime.batches import as_list, call, compute_loss, split, split_training, to_device
from precsearch.runtime.errors import InputError


class TwoInputs(nn.Module):
    def forward(self, x, y=None, scale=1.0):
        return (x if y is None else x + y) * scale


def test_split_each_batch_kind():
    x, y = torch.ones(2), torch.zeros(2)
    args, kwargs = split(x)
    assert args == (x,) and kwargs == {}
    assert split((x, y)) == ((x, y), {})
    args, kwargs = split([x, y])
    assert isinstance(args, tuple) and args == (x, y) and kwargs == {}
    args, kwargs = split({"x": x, "y": y})
    assert args == () and kwargs == {"x": x, "y": y}


def test_split_copies_the_mapping():
    batch = {"x": torch.ones(1)}
    _, kwargs = split(batch)
    kwargs["extra"] = 1
    assert list(batch) == ["x"]


@pytest.mark.parametrize("bad", [3, "text", None, 1.5, {1, 2}])
def test_split_rejects_other_types_naming_them(bad):
    with pytest.raises(InputError, match=type(bad).__name__):
        split(bad)


def test_call_passes_positional_and_keyword_inputs():
    model = TwoInputs()
    x, y = torch.full((2,), 2.0), torch.full((2,), 3.0)
    assert torch.equal(call(model, x), x)
    assert torch.equal(call(model, (x, y)), torch.full((2,), 5.0))
    assert torch.equal(call(model, [x, y, 2.0]), torch.full((2,), 10.0))
    assert torch.equal(call(model, {"x": x, "scale": 3.0}), torch.full((2,), 6.0))
    with pytest.raises(InputError):
        call(model, 7)


def test_as_list_materialises_any_iterable_once():
    tensors = [torch.full((1,), float(i)) for i in range(3)]
    generator = (t for t in tensors)
    result = as_list(generator)
    assert isinstance(result, list) and len(result) == 3
    assert all(a is b for a, b in zip(result, tensors))
    assert as_list(tuple(tensors)) == tensors
    assert as_list([{"x": tensors[0]}]) == [{"x": tensors[0]}]


def test_as_list_rejects_a_single_batch():
    with pytest.raises(InputError, match="not a single batch"):
        as_list(torch.ones(3, 4))  # iterable, but one batch
    with pytest.raises(InputError, match="not a single batch"):
        as_list({"x": torch.ones(3)})


def test_as_list_rejects_empty_data():
    with pytest.raises(InputError, match="data is empty"):
        as_list([])
    with pytest.raises(InputError, match="data is empty"):
        as_list(iter(()))


@pytest.mark.parametrize("batches,index", [
    ([torch.zeros(0, 4)], 0),
    ([torch.ones(2, 4), {"input_ids": torch.zeros(0, 16, dtype=torch.long), "mask": torch.zeros(0, 16)}], 1),
    ([(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))], 0),
])
def test_as_list_rejects_a_batch_with_no_elements(batches, index):
    with pytest.raises(InputError, match=f"data: batch {index} is empty") as error:
        as_list(batches)
    assert "\n" not in str(error.value)


def test_a_batch_with_some_empty_tensors_or_no_tensor_is_kept():
    kept = [{"x": torch.ones(2, 4), "past": torch.zeros(2, 0)}, ("text",)]
    assert as_list(kept) == kept


def test_fingerprint_changes_with_values_shapes_dtypes_and_structure():
    from precsearch.runtime.batches import fingerprint

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    same = fingerprint([x])
    assert fingerprint([x.clone()]) == same and fingerprint([x.t().contiguous().t()]) == same
    others = [[x + 1e-6], [x.reshape(3, 4)], [x.double()], [(x,)], [{"x": x}], [x, x], [x[:0]]]
    prints = {fingerprint(batches) for batches in others}
    assert same not in prints and len(prints) == len(others)
    assert fingerprint([{"x": x, "flag": object()}]) == fingerprint([{"x": x, "flag": object()}])  # no addresses


def test_as_list_rejects_non_iterables_naming_the_type():
    with pytest.raises(InputError, match="not int"):
        as_list(5)
    with pytest.raises(InputError, match="not NoneType"):
        as_list(None)


def test_as_list_rejects_a_bad_batch_inside():
    with pytest.raises(InputError, match="not int"):
        as_list([torch.ones(1), 3])
    with pytest.raises(InputError, match="not str"):
        as_list("abc")  # iterable, but of strings


def test_to_device_moves_nested_tensors_and_keeps_containers():
    batch = {"a": torch.ones(1), "b": (torch.zeros(1), [torch.ones(2), "label"]), "n": 3}
    moved = to_device(batch, "cpu")
    assert set(moved) == {"a", "b", "n"}
    assert isinstance(moved["b"], tuple) and isinstance(moved["b"][1], list)
    assert moved["n"] == 3 and moved["b"][1][1] == "label"
    assert torch.equal(moved["b"][1][0], torch.ones(2))
    meta = to_device(batch, "meta")
    assert meta["a"].device.type == "meta" and meta["b"][1][0].device.type == "meta"
    assert meta["b"][1][1] == "label" and batch["a"].device.type == "cpu"


def test_split_training():
    x, target = torch.ones(2, 3), torch.tensor([0, 1])
    assert split_training((x, target)) == (x, target)
    inputs, got = split_training([{"x": x}, target])
    assert inputs == {"x": x} and got is target


@pytest.mark.parametrize(("bad", "found"), [
    (torch.ones(2), "got Tensor"),
    ((torch.ones(2),), "got tuple of length 1"),
    ([torch.ones(2), torch.ones(2), torch.ones(2)], "got list of length 3"),
    ({"x": torch.ones(2)}, "got dict"),
])
def test_split_training_rejects_anything_but_a_pair(bad, found):
    with pytest.raises(InputError, match=found) as error:
        split_training(bad, where="batch 4")
    assert str(error.value).startswith("batch 4: training mode needs each batch as (inputs, target)")


def test_compute_loss_returns_a_scalar():
    output, target = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    loss = compute_loss(nn.MSELoss(), output, target)
    assert loss.shape == () and loss.item() == pytest.approx(2.0)
    one = compute_loss(lambda out, tgt: (out - tgt).sum().reshape(1, 1), output, target)
    assert one.shape == () and one.item() == pytest.approx(2.0)


def test_compute_loss_rejects_non_scalars():
    output, target = torch.ones(2, 3), torch.zeros(2, 3)
    with pytest.raises(InputError, match=r"--loss: the loss must be a scalar tensor, got \[2, 3\]"):
        compute_loss(nn.MSELoss(reduction="none"), output, target)
    with pytest.raises(InputError, match="got float"):
        compute_loss(lambda out, tgt: 1.0, output, target, name="my:loss")
    with pytest.raises(InputError, match=r"^my:loss: .* got \[0\]"):
        compute_loss(lambda out, tgt: torch.ones(0), output, target, name="my:loss")
