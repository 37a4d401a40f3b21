"""The precision registry: one entry per precision, and what the rest of precsearch asks of it."""

import pytest
import torch
from torch import nn

from precsearch.runtime.precisions import (
    AUTOCAST,
    FP32, NAMES, PRECISIONS, by_code, choices_text, is_precision, low_precisions, name_of_dtype,
    needs_loss_scaling,
)


def test_names_dtypes_and_low_flags():
    assert NAMES == ("fp8", "fp16", "bf16", "fp32") and AUTOCAST == ("fp16", "bf16", "fp32")
    assert FP32 == "fp32" and FP32 in PRECISIONS
    assert {name: p.dtype for name, p in PRECISIONS.items()} == {
        "fp8": torch.float8_e4m3fn, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    assert all(p.name == name for name, p in PRECISIONS.items())
    assert [p.name for p in low_precisions()] == ["fp8", "fp16", "bf16"]
    assert not PRECISIONS["fp32"].low and PRECISIONS["fp16"].low and PRECISIONS["bf16"].low


def test_codes_and_colors_are_unique_single_letters():
    codes = [p.code for p in PRECISIONS.values()]
    assert len(set(codes)) == len(codes)
    assert all(len(code) == 1 for code in codes)
    assert len({p.color for p in PRECISIONS.values()}) == len(PRECISIONS)
    assert {code: by_code(code) for code in codes} == {p.code: p.name for p in PRECISIONS.values()}
    with pytest.raises(KeyError):
        by_code("x")


def test_low_precisions_have_distinct_preferences():
    preferences = [p.preference for p in low_precisions()]
    assert len(set(preferences)) == len(preferences)
    first = min(low_precisions(), key=lambda p: p.preference)
    assert first.name == "bf16"  # tried first while unmeasured: it keeps FP32's range


def test_is_precision():
    assert all(is_precision(name) for name in NAMES)
    for value in ("fp12", "FP16", "", None, 16, torch.float16, ["fp16"]):
        assert not is_precision(value)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_enforce_makes_a_linear_compute_in_the_dtype_on_cpu(name):
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with PRECISIONS[name].enforce("cpu"):
        y = layer(x)
    assert y.dtype == PRECISIONS[name].dtype
    assert layer(x).dtype == torch.float32  # only inside the context
    assert layer.weight.dtype == torch.float32  # parameters untouched


def test_fp32_enforce_disables_an_outer_autocast():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
        with PRECISIONS["fp32"].enforce("cpu"):
            y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, layer(x))


def test_name_of_dtype():
    assert name_of_dtype(torch.float16) == "fp16"
    assert name_of_dtype(torch.bfloat16) == "bf16"
    assert name_of_dtype(torch.float32) == "fp32"
    assert name_of_dtype(torch.float64) == "fp32"  # no autocast op lowers float64
    assert name_of_dtype(torch.int64) == str(torch.int64)  # unknown dtypes keep their torch name


def test_needs_loss_scaling():
    assert needs_loss_scaling(["fp16"])
    assert needs_loss_scaling({"fp32", "bf16", "fp16"})
    assert not needs_loss_scaling(["bf16", "fp32"])
    assert not needs_loss_scaling([])
    assert not needs_loss_scaling(["fp8", "fp12", "nonsense"])  # unknown names are ignored, not a crash
    assert [p.name for p in PRECISIONS.values() if p.loss_scaling] == ["fp16"]


def test_available_on_cpu():
    assert all(p.available("cpu") for p in PRECISIONS.values())


def test_choices_text_lists_every_name():
    assert choices_text() == "fp8, fp16, bf16, fp32"
