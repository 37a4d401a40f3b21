"""``MODULE:FUNC`` factories for models and data, and the one-line errors for every way they fail."""

import importlib
import sys
import textwrap

import pytest
import torch
from torch import nn

from precsearch.runtime.errors import InputError
from precsearch.search.factories import DEMO_DATA, DEMO_MODEL, DEMO_TRAINING_DATA, load_data, load_model, resolve

MODULE = "psfactory_models"
SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    VALUE = 3

    def model():
        return nn.Linear(2, 2)

    def not_a_model():
        return 42

    def data():
        return [torch.ones(1, 2), torch.zeros(1, 2)]

    def data_generator():
        return (torch.ones(1, 2) for _ in range(3))

    def empty():
        return []

    def single():
        return torch.ones(4, 2)

    def bad_batches():
        return [torch.ones(1, 2), 7]

    def broken():
        raise RuntimeError("no weights here\\nsecond line of the traceback")

    def silent():
        raise KeyError()

    class Nested:
        @staticmethod
        def build():
            return nn.ReLU()
''')


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A working directory holding the factory module (and a broken one), importable."""
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    (tmp_path / "psfactory_raises.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "psfactory_syntax.py").write_text("def f(:\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for name in (MODULE, "psfactory_raises", "psfactory_syntax"):
        sys.modules.pop(name, None)


def test_resolve_good_specs(folder):
    build = resolve(f"{MODULE}:model", "model")
    assert callable(build) and isinstance(build(), nn.Linear)
    nested = resolve(f"{MODULE}:Nested.build", "model")
    assert isinstance(nested(), nn.ReLU)


def test_resolve_imports_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "psfactory_cwd.py").write_text("def f():\n    return 'here'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    importlib.invalidate_caches()
    try:
        assert resolve("psfactory_cwd:f", "model")() == "here"
    finally:
        sys.modules.pop("psfactory_cwd", None)


@pytest.mark.parametrize("spec", ["nocolon", f"{MODULE}:", ":model", "", ":"])
def test_resolve_rejects_malformed_specs(folder, spec):
    with pytest.raises(InputError, match="expected MODULE:FUNC") as error:
        resolve(spec, "model")
    assert str(error.value).startswith(f"--model {spec!r}:")


def test_resolve_missing_module(folder):
    with pytest.raises(InputError, match=r"^--data 'psfactory_nowhere:f': cannot import 'psfactory_nowhere'"):
        resolve("psfactory_nowhere:f", "data")
    with pytest.raises(InputError, match="cannot import"):
        resolve(f"{MODULE}.sub:f", "data")


def test_resolve_module_that_fails_to_import(folder):
    with pytest.raises(InputError, match="importing 'psfactory_raises' raised RuntimeError: boom at import"):
        resolve("psfactory_raises:f", "model")
    with pytest.raises(InputError, match="importing 'psfactory_syntax' raised SyntaxError"):
        resolve("psfactory_syntax:f", "model")


def test_resolve_missing_attribute(folder):
    with pytest.raises(InputError, match=f"module '{MODULE}' has no attribute 'nope'"):
        resolve(f"{MODULE}:nope", "model")
    with pytest.raises(InputError, match="has no attribute 'Nested.missing'"):
        resolve(f"{MODULE}:Nested.missing", "model")


def test_resolve_non_callable(folder):
    with pytest.raises(InputError, match="'VALUE' is not callable"):
        resolve(f"{MODULE}:VALUE", "model")


def test_load_model(folder):
    assert isinstance(load_model(f"{MODULE}:model"), nn.Linear)
    with pytest.raises(InputError, match=r"the factory returned int, not a torch.nn.Module"):
        load_model(f"{MODULE}:not_a_model")


def test_factory_that_raises_gives_one_line(folder):
    with pytest.raises(InputError) as error:
        load_model(f"{MODULE}:broken")
    message = str(error.value)
    assert message == f"--model '{MODULE}:broken': the factory raised RuntimeError: no weights here"
    with pytest.raises(InputError, match="the factory raised KeyError"):
        load_data(f"{MODULE}:silent")


def test_load_data(folder):
    batches = load_data(f"{MODULE}:data")
    assert isinstance(batches, list) and len(batches) == 2 and torch.equal(batches[0], torch.ones(1, 2))
    assert len(load_data(f"{MODULE}:data_generator")) == 3  # any iterable, materialised


@pytest.mark.parametrize(("factory", "problem"), [
    ("empty", "data is empty"),
    ("single", "not a single batch"),
    ("bad_batches", "not int"),
    ("not_a_model", "not int"),
])
def test_load_data_rejects_bad_data_naming_the_spec(folder, factory, problem):
    with pytest.raises(InputError, match=problem) as error:
        load_data(f"{MODULE}:{factory}")
    assert str(error.value).startswith(f"--data '{MODULE}:{factory}': ")


def test_demo_specs_resolve():
    assert callable(resolve(DEMO_MODEL, "model"))
    assert callable(resolve(DEMO_DATA, "data"))
    pairs = resolve(DEMO_TRAINING_DATA, "data")(batches=1, batch_size=4)
    assert len(pairs) == 1 and pairs[0][0].shape == (4, 64) and pairs[0][1].shape == (4,)


def test_hf_specs_and_data_files_are_not_factories(tmp_path):
    from precsearch.search.datafiles import DataOptions

    with pytest.raises(InputError, match="is not a local directory: download it first"):
        load_model("hf:org/some-model")
    with pytest.raises(InputError, match="no such file"):
        load_data(str(tmp_path / "missing.jsonl"), model_spec="hf:x")
    with pytest.raises(InputError, match="apply to --data FILE"):
        load_data(DEMO_DATA, options=DataOptions(samples=3))


def test_load_data_moves_batches_to_the_device():
    assert all(batch.device.type == "cpu" for batch in load_data(DEMO_DATA, device="cpu"))
