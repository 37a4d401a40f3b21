"""The graph walker: a model's precision units and the data flow between them.

A *unit* is a module that directly owns at least one autocast-eligible op on the target device
(a *compute* unit), or a storage module (an embedding table) whose table is read (a *storage*
unit: its precision is the dtype its weights are held in); ops owned by a child belong to the
child's unit. Discovery tries ``torch.export`` (non-strict),
then ``torch.fx.symbolic_trace``, then forward hooks with a dispatch-mode recording, which works
with any Python control flow. ``LayerGraph.method`` says which one succeeded.

>>> graph = walk(model, example_inputs)      # doctest: +SKIP
>>> graph.units[:2], graph.method
(['embeddings.word_embeddings', 'embeddings.token_type_embeddings'], 'export')
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import networkx as nx
import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from precsearch.runtime import batches as _batches
from precsearch.runtime.errors import InputError, described
from precsearch.runtime.ops import (
    STORAGE_OPS,
    device_type_of,
    estimate_flops,
    is_storage_module,
    is_unit_op,
    model_device_type,
    module_op,
    op_name,
    storage_op,
)
from precsearch.runtime.precisions import FP32, PRECISIONS
from precsearch.runtime.recording import OpRecorder

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Op:
    unit: str
    op: str
    flops: int
    sources: frozenset[str]  # units whose outputs reach this op's inputs


class LayerGraph:
    """Precision units as nodes of a ``networkx.DiGraph``; edges are data flow between units.

    Node attributes: ``type`` (module class), ``kind`` (``"compute"``, or ``"storage"`` for an
    embedding table that runs no eligible op), ``ops`` (the ops that make it a unit, with counts:
    eligible ops, or a storage unit's table reads), ``params`` (own parameter count), ``flops``
    (estimated, one pass over the example inputs; 0 for a storage unit), ``input_shapes`` /
    ``output_shapes``, ``order`` (first execution order).

    ``weight_ties`` maps a unit to the first unit (in execution order) holding one of its weights
    (GPT-2's ``lm_head`` -> ``transformer.wte``): such units are one choice, the tensor held once.
    """

    def __init__(self, graph: nx.DiGraph, method: str, device_type: str,
                 weight_ties: dict[str, str] | None = None) -> None:
        self.graph, self.method, self.device_type = graph, method, device_type
        self.weight_ties = dict(weight_ties or {})

    @property
    def units(self) -> list[str]:
        """Unit names in execution order."""
        return sorted(self.graph.nodes, key=lambda name: self.graph.nodes[name]["order"])

    def __len__(self) -> int:
        return self.graph.number_of_nodes()

    def __contains__(self, name: object) -> bool:
        return name in self.graph

    def __getitem__(self, name: str) -> dict[str, Any]:
        return self.graph.nodes[name]

    def cast_boundaries(self, precision: dict[str, str], default: str = FP32) -> int:
        """Edges whose two ends run in different precisions (each is a cast at run time)."""
        return sum(precision.get(a, default) != precision.get(b, default) for a, b in self.graph.edges)

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per unit, in execution order (for tables and ``--json``)."""
        return [{"name": name, "type": node["type"], "kind": node["kind"], "ops": dict(node["ops"]),
                 "params": node["params"],
                 "flops": node["flops"], "input_shapes": node["input_shapes"],
                 "output_shapes": node["output_shapes"]}
                for name in self.units for node in [self.graph.nodes[name]]]

    def streamed_params(self) -> dict[str, int]:
        """Parameters each unit reads whole on every call (the latency model's bytes): a compute
        unit's own, none for a storage unit, whose op reads only the rows it gathers."""
        return {name: node["params"] if node["kind"] == "compute" else 0 for name, node in self.graph.nodes.items()}

    def __repr__(self) -> str:
        return f"LayerGraph({len(self)} units, {self.graph.number_of_edges()} edges, method={self.method!r})"


def walk(model: nn.Module, example_inputs: Any, *, device: str | torch.device | None = None) -> LayerGraph:
    """Discover the precision units of ``model`` run on ``example_inputs`` (one batch).

    ``device`` picks the autocast op list (cpu or cuda); by default the model's own device.
    """
    device_type = device_type_of(device) if device is not None else model_device_type(model)
    args, kwargs = _batches.split(example_inputs)
    modules = dict(model.named_modules())
    for method, discover in (("export", _via_export), ("fx", _via_fx), ("hooks", _via_hooks)):
        try:
            ops = discover(model, modules, args, kwargs, device_type)
        except Exception as error:  # each tracer fails in its own ways; the next one takes over
            log.info("graph walker: %s failed (%s: %s)", method, type(error).__name__, str(error)[:200])
            failure = error
            continue
        break
    else:
        # The hooks run the model as it is: their failure is the model's own.
        raise InputError(f"the model cannot be walked on the example inputs: {described(failure)}")
    shapes = _unit_shapes(model, {op.unit for op in ops}, args, kwargs)
    graph = _build(ops, modules, shapes)
    return LayerGraph(graph, method, device_type, _weight_ties(graph, modules))


# -- discovery ----------------------------------------------------------------------------------
class _TensorOutputs(nn.Module):
    """Exposes only the tensors of a model's output, so that ``torch.export`` accepts models
    returning objects it cannot flatten (e.g. a transformers ``DynamicCache``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        leaves = torch.utils._pytree.tree_leaves(self.inner(*args, **kwargs))
        return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Tracers log whole graphs when they give up; the next tracer takes over, so hush them."""
    loggers = [logging.getLogger(name) for name in ("torch", "torch.fx", "torch.export", "torch._dynamo",
                                                     "torch.fx.experimental.symbolic_shapes")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        # torch.export prints the partial graph of a failed trace straight to stderr.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _via_export(model, modules, args, kwargs, device_type) -> list[_Op]:
    with _quiet_torch_logs(), torch.no_grad():
        program = torch.export.export(_TensorOutputs(model), args, kwargs, strict=False)

    def owner(node: torch.fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        path = path.removeprefix("inner").removeprefix(".")
        return path if path in modules else ""

    return _flow(program.graph, owner, lambda node: op_name(node.target), device_type,
                 lambda node: [_node_shape(arg) for arg in node.args], _storage_names(modules))


def _via_fx(model, modules, args, kwargs, device_type) -> list[_Op]:
    from torch.fx.passes.shape_prop import ShapeProp

    if kwargs:
        raise TypeError("fx.symbolic_trace takes positional inputs only")
    with _quiet_torch_logs(), torch.no_grad():
        traced = torch.fx.symbolic_trace(model)
        ShapeProp(traced).propagate(*args)

    def owner(node: torch.fx.Node) -> str:
        if node.op == "call_module":
            return str(node.target)
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        return path if path in modules else ""

    def name(node: torch.fx.Node) -> str:
        if node.op == "call_module":
            return module_op(modules[node.target]) or storage_op(modules[node.target]) or ""
        return op_name(node.target)

    def shapes(node: torch.fx.Node) -> list:
        found = [_node_shape(arg) for arg in node.args]
        weight = getattr(modules[node.target], "weight", None) if node.op == "call_module" else None
        return found[:1] + [tuple(weight.shape)] if isinstance(weight, torch.Tensor) else found

    return _flow(traced.graph, owner, name, device_type, shapes, _storage_names(modules))


def _node_shape(value: Any) -> tuple[int, ...] | None:
    meta = value.meta if isinstance(value, torch.fx.Node) else {}
    val = meta.get("val", meta.get("tensor_meta"))
    if isinstance(val, (tuple, list)) and not hasattr(val, "shape"):  # TensorMetadata has .shape
        val = val[0] if val else None
    shape = getattr(val, "shape", None)
    try:
        return tuple(int(size) for size in shape) if shape is not None else None
    except (TypeError, ValueError):  # symbolic sizes
        return None


def _storage_names(modules: dict[str, nn.Module]) -> frozenset[str]:
    return frozenset(name for name, module in modules.items() if is_storage_module(module))


def _flow(graph: torch.fx.Graph, owner, name, device_type, shapes, storage: frozenset[str]) -> list[_Op]:
    """Walk an FX graph: nodes that make their module a unit become ops; each node carries the
    set of units whose outputs reach it through other ops."""
    frontier: dict[torch.fx.Node, frozenset[str]] = {}
    ops: list[_Op] = []
    for node in graph.nodes:
        reaching = frozenset().union(*(frontier.get(arg, frozenset()) for arg in node.all_input_nodes))
        unit = owner(node) if node.op in ("call_function", "call_method", "call_module") else None
        if unit is not None and is_unit_op(name(node), device_type, unit in storage):
            flops = estimate_flops(name(node), shapes(node), _node_shape(node))
            ops.append(_Op(unit, name(node), flops, reaching))
            frontier[node] = frozenset({unit})
        else:
            frontier[node] = reaching
    if not ops:
        raise RuntimeError("no eligible ops found in the traced graph")
    return ops


def _via_hooks(model, modules, args, kwargs, device_type) -> list[_Op]:
    """Run the model once, recording kernels and which units' outputs feed them."""
    produced_by: WeakIdKeyDictionary = WeakIdKeyDictionary()
    ops: list[_Op] = []
    storage = _storage_names(modules)

    def on_op(func, op_args, output, unit) -> None:
        tensors = [a for a in torch.utils._pytree.tree_leaves((op_args,)) if isinstance(a, torch.Tensor)]
        reaching = frozenset().union(*(produced_by.get(t, frozenset()) for t in tensors))
        name = op_name(func)
        if is_unit_op(name, device_type, unit in storage):
            shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in op_args]
            first = output[0] if isinstance(output, (tuple, list)) else output
            ops.append(_Op(unit, name, estimate_flops(name, shapes, getattr(first, "shape", None)), reaching))
            reaching = frozenset({unit})
        for tensor in torch.utils._pytree.tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and reaching:
                produced_by[tensor] = reaching

    with torch.no_grad(), OpRecorder(model, device_type, on_op=on_op):
        model(*args, **kwargs)
    if not ops:
        raise RuntimeError("the model ran no autocast-eligible op (nor read a table) on these inputs")
    return ops


def _unit_shapes(model: nn.Module, units: set[str], args: tuple, kwargs: dict) -> dict[str, tuple[list, list]]:
    """Input and output tensor shapes of each unit's first call."""
    shapes: dict[str, tuple[list, list]] = {}

    def tensors(value: Any) -> list[list[int]]:
        return [list(t.shape) for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]

    def recorder(name: str) -> Any:
        def record(module: nn.Module, inputs: Any, kw: Any, output: Any) -> None:
            shapes.setdefault(name, (tensors((inputs, kw)), tensors(output)))
        return record

    # Hooks on the units themselves: a global hook registered with kwargs outlives its removal
    # in torch (an entry stays behind), and every later torch.compile would warn about it.
    hooks = [module.register_forward_hook(recorder(name), with_kwargs=True)
             for name, module in model.named_modules() if name in units]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _build(ops: Iterable[_Op], modules: dict[str, nn.Module], shapes) -> nx.DiGraph:
    graph = nx.DiGraph()
    for op in ops:
        if op.unit not in graph:
            module = modules[op.unit]
            inputs, outputs = shapes.get(op.unit, ([], []))
            graph.add_node(op.unit, type=type(module).__name__, kind="storage", ops=Counter(), flops=0,
                           order=len(graph),
                           params=sum(p.numel() for p in module.parameters(recurse=False)),
                           input_shapes=inputs, output_shapes=outputs,
                           unsuited=tuple(name for name, p in PRECISIONS.items() if p.unsuitable(module)))
        node = graph.nodes[op.unit]
        node["ops"][op.op] += 1
        node["flops"] += op.flops
        if op.op not in STORAGE_OPS:
            node["kind"] = "compute"
        for source in op.sources:
            if source != op.unit:
                graph.add_edge(source, op.unit)
    return graph


def _weight_ties(graph: nx.DiGraph, modules: dict[str, nn.Module]) -> dict[str, str]:
    """Each unit holding a floating weight that a unit before it (in execution order) holds too
    -> that first holder: an embedding tied to its output projection."""
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    for unit in sorted(graph.nodes, key=lambda name: graph.nodes[name]["order"]):
        for tensor in modules[unit].parameters(recurse=False):
            if tensor.is_floating_point():
                holder = first.setdefault(id(tensor), unit)
                if holder != unit:
                    ties.setdefault(unit, holder)
    return ties
