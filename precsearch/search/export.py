"""A plan shipped as an AOTInductor package: ``precsearch export`` and ``check --package``.

The model runs with the plan applied and its low weights held (learnt from the first batch), is
exported with ``torch.export.export`` and compiled into one ``.pt2`` file by
``torch._inductor.aoti_compile_and_package``; ``torch._inductor.aoti_load_package`` runs it in a
process that has torch and nothing else. The package returns the model's floating-point outputs
as a flat tuple, in the order ``precsearch.runtime.accuracy.flatten_outputs`` gives them, so that no
output class (a transformers ``ModelOutput``) is needed to load it.

Export is non-strict (``strict=False``): the plan's wrappers and autocast contexts run as Python
and only the ops they issue are recorded. Strict export (dynamo tracing) of the same model does
export, but AOTInductor then rejects the program at its ``wrap_with_autocast`` regions ("Tensor
dtype mismatch! Expected: torch.float32, Got: torch.bfloat16": the low weights held inside them),
while the non-strict program compiles and matches the eager plan. The model is exported through
``_Exported``, a plain module whose ``forward`` calls it, because the plan replaces the root's
``forward`` with an object that ``torch.export`` cannot inspect (it has no ``__code__``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from precsearch.runtime import batches as _batches
from precsearch.runtime.accuracy import Fidelity, flatten_outputs, max_abs, run_outputs
from precsearch.search import bench
from precsearch.search.bench import RaceResult
from precsearch.search.compiled import eval_mode
from precsearch.runtime.errors import InputError, described, failures_as
from precsearch.runtime.plan import Plan
from precsearch.runtime.apply import PlanHandle, apply_plan
from precsearch.runtime.weights import weight_bytes

SUFFIX = ".pt2"  # AOTInductor writes packages by this name only


class NotExportable(InputError):
    """The model, with the plan applied, cannot be exported or compiled by AOTInductor (exit 2)."""


@dataclasses.dataclass(frozen=True)
class PackageCheck:
    """The package's error against the FP32 model under the plan's metric, and its limit
    (None: the plan states no limit for a built-in metric)."""

    metric: str
    error: float
    limit: float | None

    @property
    def within_limit(self) -> bool | None:
        return None if self.limit is None else self.error <= self.limit

    def verdict(self) -> str:
        """One line for people."""
        numbers = f"{self.metric} {self.error:.4g} against FP32"
        if self.limit is None:
            return f"package: {numbers}; the plan states no {self.metric} limit to check"
        if self.within_limit:
            return f"package: ok, {numbers} within the limit {self.limit:g}"
        return f"package: FAILED, {numbers} over the limit {self.limit:g}"


@dataclasses.dataclass(frozen=True)
class Verification:
    """The package against the eager plan (largest output difference) and against FP32 (the
    plan's metric), and its latency beside eager FP32 (the race's baseline) and the eager plan,
    timed interleaved."""

    max_diff: float
    check: PackageCheck
    race: RaceResult

    def latency_rows(self) -> list[dict[str, Any]]:
        """One row per timed form: median ms and speedup over eager FP32 with its interval."""
        return [{"form": name, "median ms": round(timing.median_ms, 3), "vs fp32 eager": str(self.race.speedups[name])}
                for name, timing in self.race.timings.items()]


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What ``export_plan`` wrote and measured."""

    path: Path
    size_bytes: int
    weight_bytes: dict[str, int]        # the exported weights by dtype ({"bf16": ..., "fp32": ...})
    dynamic_dims: dict[str, list[int]]  # input -> its dimensions left dynamic
    dynamic_note: str | None            # why --dynamic gave less than asked, if it did
    export_s: float
    verification: Verification


class _Exported(nn.Module):
    """A plain module around the model with its plan applied: what ``torch.export`` traces.
    Its outputs are the model's floating-point tensors, flattened."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return tuple(flatten_outputs(self.model(*args, **kwargs)))


def _exported(model: nn.Module, args: tuple, kwargs: dict) -> _Exported:
    """``_Exported`` with a ``forward`` that names the batch's inputs (``input_0``... then its
    keywords): ``torch.export`` matches dynamic shapes to named parameters, not to ``**kwargs``."""
    Parameter = inspect.Parameter
    signature = inspect.Signature(
        [Parameter("self", Parameter.POSITIONAL_ONLY)]
        + [Parameter(name, Parameter.POSITIONAL_ONLY) for name in _positional_names(args)]
        + [Parameter(name, Parameter.KEYWORD_ONLY) for name in kwargs])

    def forward(self: _Exported, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return _Exported.forward(self, *args, **kwargs)

    forward.__signature__ = signature  # type: ignore[attr-defined]
    return type("_ExportedWithInputs", (_Exported,), {"forward": forward})(model)


def _positional_names(args: tuple) -> list[str]:
    return [f"input_{index}" for index in range(len(args))]


def export_plan(model: nn.Module, plan: Plan, batches: list[Any], out: str | os.PathLike, *,
                dynamic: bool = False, device_type: str = "cpu", fingerprint_mismatch: str = "error",
                repeats: int = 15) -> ExportResult:
    """Write ``model`` with ``plan`` applied (low weights held) to ``out`` as an AOTInductor
    package, and verify it on ``batches``. The model runs in eval mode; the plan is removed after.

    >>> result = export_plan(model, load_plan("plan.yaml"), batches, "model.pt2")   # doctest: +SKIP
    >>> result.verification.check.within_limit
    True

    Raises ``NotExportable`` (one line, naming what stopped it) when the model cannot be exported;
    nothing is left at ``out`` then.
    """
    if plan.mode != "inference":
        raise InputError("export: only inference plans can be exported (this plan is for training)")
    out = checked_out(out)
    with eval_mode(model):
        fidelity = Fidelity.of_constraint(model, batches, plan.constraint)
        with apply_plan(model, plan, device_type=device_type, example_inputs=batches[0],
                        fingerprint_mismatch=fingerprint_mismatch) as handle:
            started = time.perf_counter()
            program, dims, note = export_program(model, batches[0], dynamic)
            write_package(program, out)
            export_s = time.perf_counter() - started
            verification = verify_package(out, model, handle, batches, fidelity, device_type, repeats)
    return ExportResult(out, out.stat().st_size, _program_weight_bytes(program), dims, note,
                        round(export_s, 2), verification)


def export_program(model: nn.Module, batch: Any,
                   dynamic: bool) -> tuple[Any, dict[str, list[int]], str | None]:
    """``model`` (plan applied) exported non-strict on ``batch``: the program, the input
    dimensions left dynamic, and a note when ``dynamic`` asked for more than the model allows."""
    args, kwargs = _batches.split(batch)
    wrapped = _exported(model, args, kwargs)
    if dynamic:
        try:
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                program = torch.export.export(wrapped, args, kwargs, dynamic_shapes=_auto_dims(args, kwargs),
                                              strict=False)
            dims = _dynamic_dims(program)
            fixed = "--dynamic: the model fixes every input dimension; exported static"
            return program, dims, None if dims else fixed
        except Exception as error:
            note = f"--dynamic: export with dynamic shapes failed ({described(error)}); exported static"
    else:
        note = None
    with _named_failure("torch.export"), torch.no_grad():
        program = torch.export.export(wrapped, args, kwargs, strict=False)
    return program, {}, note


def write_package(program: Any, out: Path) -> Path:
    """Compile ``program`` into an AOTInductor package at ``out``: written to a temporary file in
    the same folder, then renamed; nothing is left behind when it fails."""
    temporary = out.with_name(f".{out.stem}.{os.getpid()}.partial{SUFFIX}")
    try:
        with _named_failure("AOTInductor"):
            torch._inductor.aoti_compile_and_package(program, package_path=str(temporary))
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    return out


def load_package(path: str | os.PathLike) -> Callable[..., Any]:
    """The package at ``path``, loaded to run; a missing or unreadable one is bad input."""
    if not Path(path).is_file():
        raise InputError(f"--package {str(path)!r}: no such file")
    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception as error:
        raise InputError(f"--package {str(path)!r}: not a loadable AOTInductor package: "
                         f"{described(error)}") from None


def check_package(package: Callable[..., Any], fidelity: Fidelity,
                  path: str | os.PathLike = "") -> PackageCheck:
    """The package's error under ``fidelity`` (its FP32 reference, all of its batches)."""
    try:
        error = fidelity.error(package)  # type: ignore[arg-type]  # called like a model
    except InputError:
        raise
    except Exception as failure:  # a static package given batches of other shapes, say
        raise InputError(f"the package {str(path)!r} cannot run the data: {described(failure)} "
                         f"(batches of other shapes need an export with --dynamic)") from None
    return PackageCheck(fidelity.name, error, fidelity.limit)


def verify_package(path: Path, model: nn.Module, handle: PlanHandle, batches: list[Any], fidelity: Fidelity,
                   device_type: str = "cpu", repeats: int = 15) -> Verification:
    """The package at ``path`` against ``model`` running its plan eagerly (``handle``): largest
    output difference, its error against FP32 under ``fidelity``, and its latency beside eager
    FP32 (the plan suspended) and the eager plan, in one interleaved run on the first batch."""
    package = load_package(path)
    check = check_package(package, fidelity, path)
    max_diff = max_abs(run_outputs(package, batches), run_outputs(model, batches))  # type: ignore[arg-type]
    runners: dict[str, bench.Runner] = {
        "fp32 eager": (handle.suspended, _batches.forward_runner(model, batches[0])),
        "plan eager": _batches.forward_runner(model, batches[0]),
        "package": _batches.forward_runner(package, batches[0])}
    race = bench.race(runners, baseline="fp32 eager", device_type=device_type, repeats=repeats, warmup=2)
    return Verification(max_diff, check, race)


def checked_out(out: str | os.PathLike) -> Path:
    """``--out``: a ``.pt2`` file in a folder that exists."""
    path = Path(out)
    if path.suffix != SUFFIX:
        raise InputError(f"--out {str(out)!r}: an AOTInductor package must be named *{SUFFIX}")
    if not path.parent.is_dir():
        raise InputError(f"--out {str(out)!r}: the folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise InputError(f"--out {str(out)!r} is a folder: give a file name ending in {SUFFIX}")
    return path


def _auto_dims(args: tuple, kwargs: dict) -> tuple | dict:
    """Every tensor input's batch dimension (and second dimension, where it has one) marked
    ``Dim.AUTO``: dynamic where the model allows, fixed where it does not (keyed by the
    parameter names of ``_exported``'s ``forward``)."""
    def dims(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return {i: torch.export.Dim.AUTO for i in range(min(value.dim(), 2))}
        return None
    # keyed by the parameters of ``_Exported.forward``
    named = {**dict(zip(_positional_names(args), args)), **kwargs}
    return {name: dims(value) for name, value in named.items()}


def _dynamic_dims(program: Any) -> dict[str, list[int]]:
    """Input name -> the dimensions the exported program left symbolic."""
    dims = {}
    for spec in program.graph_signature.input_specs:
        if spec.kind.name != "USER_INPUT":
            continue
        node = next(n for n in program.graph.nodes if n.name == spec.arg.name)
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            symbolic = [i for i, size in enumerate(value.shape) if not is_concrete_int(size)]
            if symbolic:
                dims[spec.arg.name] = symbolic
    return dims


def _program_weight_bytes(program: Any) -> dict[str, int]:
    """Bytes of the exported program's parameters, buffers and constants, by dtype."""
    holder = nn.Module()
    for index, tensor in enumerate([*program.state_dict.values(), *program.constants.values()]):
        if isinstance(tensor, torch.Tensor):
            holder.register_buffer(f"t{index}", tensor)
    return weight_bytes(holder)


@contextmanager
def _named_failure(stage: str) -> Iterator[None]:
    """Any failure of ``stage`` becomes one ``NotExportable`` line: the exception's first line.
    What torch writes to stderr meanwhile is dropped."""
    prefix = f"export: the model with this plan cannot be exported ({stage}): "
    # torch prints the partial graph of a failed export
    with failures_as(NotExportable, prefix, keep=InputError), contextlib.redirect_stderr(io.StringIO()):
        yield
