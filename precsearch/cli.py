"""The ``precsearch`` command: argument parsing and error presentation only.

Exit codes: 0 success; 1 the work ran but its result failed (no feasible plan, the audit
found a mismatch); 2 bad input, with a one-line message naming the culprit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from precsearch.errors import InputError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so every usage error is one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"{self.prog}: {message}")


def _add_model_args(parser: argparse.ArgumentParser, *, demo: bool = True) -> None:
    note = " (default: the built-in demo)" if demo else ""
    parser.add_argument("--model", metavar="MODULE:FUNC", help=f"factory returning an nn.Module{note}")
    parser.add_argument("--data", metavar="MODULE:FUNC",
                        help=f"factory returning a list of batches (Tensor, tuple or dict){note}")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")


def _model_and_data(args: argparse.Namespace) -> tuple[Any, list[Any], str, str]:
    """Load the factories (or the demo), move both to the device; returns the model's name too."""
    import torch

    from precsearch import factories
    from precsearch.batches import to_device
    from precsearch.ops import device_type_of

    if (args.model is None) != (args.data is None):
        raise InputError("--model and --data go together: give both, or neither for the built-in demo")
    model_spec = args.model or factories.DEMO_MODEL
    data_spec = args.data or factories.DEMO_DATA
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device_type_of(device)
        torch.empty(0, device=device)
    except (ValueError, RuntimeError) as error:
        raise InputError(f"--device {device!r}: {str(error).splitlines()[0]}") from None
    model = factories.load_model(model_spec).to(device)
    data = [to_device(batch, device) for batch in factories.load_data(data_spec)]
    return model, data, device, model_spec


def cmd_layers(args: argparse.Namespace) -> int:
    from precsearch.graph import walk
    from precsearch.report import format_table, human

    model, data, device, _ = _model_and_data(args)
    graph = walk(model, data[0], device=device)
    rows = graph.rows()
    if args.json:
        print(json.dumps([{key: row[key] for key in ("name", "type", "ops", "params", "flops")} for row in rows],
                         indent=2))
        return EXIT_OK
    table = [{"unit": row["name"] or "<root>", "type": row["type"],
              "ops": ", ".join(f"{op}×{n}" if n > 1 else op for op, n in row["ops"].items()),
              "params": row["params"], "flops": human(row["flops"])} for row in rows]
    print(format_table(table))
    print(f"\n{len(graph)} precision units, {graph.graph.number_of_edges()} data-flow edges "
          f"(found by {graph.method}, device {device})")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from precsearch.plan import load_plan
    from precsearch.runtime import apply_plan, audit

    plan = load_plan(args.plan)
    model, data, device, _ = _model_and_data(args)
    mismatch = "warn" if args.ignore_fingerprint else "error"
    with apply_plan(model, plan, fingerprint_mismatch=mismatch):
        report = audit(model, plan, data)
    if args.json:
        print(json.dumps({"ok": report.ok, "ops": len(report.entries),
                          "mismatches": [vars(e) for e in report.mismatches]}, indent=2))
    else:
        print(report)
    return EXIT_OK if report.ok else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="precsearch", description=(
        "Find, per layer of a PyTorch model, the fastest precision (fp16, bf16, fp32) that keeps "
        "accuracy inside your limit, and enforce it at run time."))
    from precsearch import __version__

    parser.add_argument("--version", action="version", version=f"precsearch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    layers = commands.add_parser("layers", help="list the model's precision units",
                                 description="List the precision units (modules that own autocast-eligible ops).")
    _add_model_args(layers)
    layers.add_argument("--json", action="store_true", help="one JSON object per unit")
    layers.set_defaults(run=cmd_layers)

    check = commands.add_parser("check", help="audit that a plan runs every op in its planned dtype",
                                description="Apply a plan, run the data, and record the dtype every "
                                            "eligible op computed in. Exit 1 on any mismatch.")
    check.add_argument("--plan", required=True, metavar="PLAN.yaml", help="the plan to check")
    _add_model_args(check)
    check.add_argument("--json", action="store_true", help="machine-readable result")
    check.add_argument("--ignore-fingerprint", action="store_true",
                       help="warn instead of failing when the plan was made for another model")
    check.set_defaults(run=cmd_check)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"precsearch: warning: {str(message).splitlines()[0]}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings

    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
        if run is None:
            parser.print_help()
            return EXIT_BAD_INPUT
        return run(args)
    except InputError as error:
        print(f"precsearch: error: {str(error).splitlines()[0] if str(error) else 'bad input'}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # e.g. `precsearch layers | head`
        sys.stdout = open(os.devnull, "w")
        return EXIT_OK
    except KeyboardInterrupt:
        print("precsearch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
