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

from precsearch.runtime.errors import InputError, described

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
SEARCH_EXTRA = frozenset({"optuna", "pandas", "matplotlib", "networkx"})   # pip install 'precsearch[search]'


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so every usage error is one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"{self.prog}: {message}")


def _add_model_args(parser: argparse.ArgumentParser, *, demo: bool = True) -> None:
    note = " (default: the built-in demo)" if demo else ""
    parser.add_argument("--model", metavar="MODULE:FUNC|hf:DIR",
                        help=f"factory returning an nn.Module, or hf:DIR, a local transformers checkpoint "
                             f"directory (save_pretrained; never downloaded){note}; inference runs it in eval "
                             f"mode (model.eval())")
    parser.add_argument("--data", metavar="MODULE:FUNC|FILE",
                        help=f"factory returning a list of batches (Tensor, tuple or dict), or FILE: .txt (one "
                             f"example a line), .jsonl or .csv (a text field, an optional label, and for token "
                             f"classification optional labels, one per word) or a datasets.save_to_disk folder, "
                             f"tokenized with the hf:DIR checkpoint's tokenizer; for an image checkpoint a folder "
                             f"of images (one subfolder per class for labels) or a .jsonl/.csv with an image "
                             f"path field, through its image processor{note}")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    _add_data_file_args(parser)


def _add_data_file_args(parser: argparse.ArgumentParser) -> None:
    from precsearch.runtime.hf import TASKS

    parser.add_argument("--task", choices=list(TASKS), metavar="TASK",
                        help="hf:DIR: load the checkpoint with this task's Auto class (default: the class its "
                             "config.json's architectures name): " + ", ".join(TASKS))
    parser.add_argument("--text-field", default="text", metavar="NAME",
                        help="--data FILE: the field (column) holding the text (default: text)")
    parser.add_argument("--image-field", default="image", metavar="NAME",
                        help="--data FILE: the field (column) holding an image's path, relative to the file's "
                             "folder, for an image checkpoint (default: image)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                        help="--data FILE: examples per batch (default: 8)")
    parser.add_argument("--max-length", type=_positive_int, default=128, metavar="N",
                        help="--data FILE: tokens per example, longer ones truncated (default: 128)")
    parser.add_argument("--samples", type=_positive_int, default=None, metavar="N",
                        help="--data FILE: use N examples, a seeded choice (--seed; default: all)")


def _add_fingerprint_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ignore-fingerprint", action="store_true",
                        help="warn instead of failing when the plan was made for another model")


def _fingerprint_mismatch(args: argparse.Namespace) -> str:
    """What applying a plan made for another model does: ``--ignore-fingerprint`` warns."""
    return "warn" if args.ignore_fingerprint else "error"


def _data_options(args: argparse.Namespace) -> Any:
    from precsearch.search.datafiles import DataOptions

    return DataOptions(text_field=args.text_field, image_field=args.image_field, batch_size=args.batch_size,
                       max_length=args.max_length, samples=args.samples, seed=getattr(args, "seed", 0))


def _model_and_data(args: argparse.Namespace, *, training: bool = False) -> tuple[Any, list[Any], str, str]:
    """Load the factories (or the demo), move both to the device; returns the model's name too.
    ``training``: the demo's training batches, and the model in train mode (else eval mode)."""
    import torch

    from precsearch.search import factories
    from precsearch.runtime.ops import device_type_of

    if (args.model is None) != (args.data is None):
        raise InputError("--model and --data go together: give both, or neither for the built-in demo")
    model_spec = args.model or factories.DEMO_MODEL
    data_spec = args.data or (factories.DEMO_TRAINING_DATA if training else factories.DEMO_DATA)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device_type_of(device)
        torch.empty(0, device=device)
    except Exception as error:  # e.g. "Torch not compiled with CUDA enabled" is an AssertionError
        raise InputError(f"--device {device!r}: {str(error).splitlines()[0]}") from None
    options = _data_options(args)
    examples = factories.read_data_file(data_spec, model_spec, options)  # a bad file fails before the model loads
    model = factories.load_model(model_spec, args.task).to(device)
    model.train(training)  # inference runs in eval mode: no dropout, BatchNorm's running statistics
    data = factories.load_data(data_spec, model=model, model_spec=model_spec, options=options, device=device,
                               examples=examples)
    _check_runs(model, data[0], training, model_spec, data_spec)
    return model, data, device, model_spec


def _check_runs(model: Any, batch: Any, training: bool, model_spec: str, data_spec: str) -> None:
    """The FP32 model must run on the data before anything else is measured against it."""
    import torch

    from precsearch.runtime.batches import call, split_training

    inputs = split_training(batch, f"--data {data_spec!r}")[0] if training else batch
    try:
        with torch.no_grad():
            call(model, inputs)
    except Exception as error:
        raise InputError(f"--model {model_spec!r} failed on the FP32 reference run with --data {data_spec!r}: "
                         f"{described(error)}") from None


def cmd_layers(args: argparse.Namespace) -> int:
    from precsearch.search.graph import walk
    from precsearch.report.summary import format_table, human

    model, data, device, _ = _model_and_data(args)
    graph = walk(model, data[0], device=device)
    rows = graph.rows()
    if args.json:
        print(json.dumps([{key: row[key] for key in ("name", "type", "kind", "ops", "params", "flops")}
                          for row in rows], indent=2))
        return EXIT_OK
    table = [{"unit": row["name"] or "<root>", "type": row["type"], "kind": row["kind"],
              "ops": ", ".join(f"{op}×{n}" if n > 1 else op for op, n in row["ops"].items()),
              "params": row["params"], "flops": human(row["flops"])} for row in rows]
    print(format_table(table))
    tables = sum(row["kind"] == "storage" for row in rows)
    storage = f" ({tables} storage: embedding tables, held in their unit's dtype)" if tables else ""
    print(f"\n{len(graph)} precision units{storage}, {graph.graph.number_of_edges()} data-flow edges "
          f"(found by {graph.method}, device {device})")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from precsearch.runtime.ops import device_type_of
    from precsearch.runtime.plan import load_plan
    from precsearch.search import factories
    from precsearch.search.check import PlanBreaksModel, check

    plan = load_plan(args.plan)
    if args.package:
        return _check_package(args, plan)
    training = plan.mode == "training"  # training plans audit backward too
    model, data, device, _ = _model_and_data(args, training=training)
    loss_fn = factories.resolve(args.loss, "loss") if training and args.loss else None
    try:
        result = check(model, plan, data, compile=args.compile, loss_fn=loss_fn, device_type=device_type_of(device),
                       fingerprint_mismatch=_fingerprint_mismatch(args))
    except PlanBreaksModel as error:
        print(f"precsearch: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return EXIT_OK if result.ok else EXIT_FAILED


def _check_package(args: argparse.Namespace, plan: Any) -> int:
    """``check --package``: the package's error against the FP32 model within the plan's limit."""
    from precsearch.search.check import check_exported, load_package_for

    package = load_package_for(plan, args.package)  # before the model is built
    model, data, _, _ = _model_and_data(args)
    result = check_exported(package, model, plan, data, path=args.package,
                            fingerprint_mismatch=_fingerprint_mismatch(args))
    if args.json:
        print(json.dumps({"ok": result.within_limit is not False, "metric": result.metric, "error": result.error,
                          "limit": result.limit}, indent=2))
    else:
        print(result.verdict())
    return EXIT_FAILED if result.within_limit is False else EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from precsearch.search.export import checked_out, export_plan
    from precsearch.runtime.ops import device_type_of
    from precsearch.runtime.plan import load_plan
    from precsearch.report.summary import format_table
    from precsearch.runtime.weights import MB

    plan = load_plan(args.plan)
    checked_out(args.out)  # before the model is built
    model, data, device, _ = _model_and_data(args)
    result = export_plan(model, plan, data, args.out, dynamic=args.dynamic, device_type=device_type_of(device),
                         fingerprint_mismatch=_fingerprint_mismatch(args))
    if result.dynamic_note:
        _warn(result.dynamic_note)
    if plan.resolved_runtime.run.generates:
        _warn(f"the plan was searched for generation ({plan.resolved_runtime.run.describe()}); the package holds "
              f"the model's forward pass, without the generation loop: the latencies below are one forward pass")
    check, weights = result.verification.check, ", ".join(
        f"{dtype} {size / MB:.2f} MB" for dtype, size in sorted(result.weight_bytes.items()))
    dynamic = "; dynamic: " + ", ".join(f"{name} dims {dims}" for name, dims in result.dynamic_dims.items()) \
        if result.dynamic_dims else ""
    print(f"package: {result.path} ({result.size_bytes / MB:.2f} MB on disk; weights {weights}; "
          f"exported and compiled in {result.export_s:.1f} s{dynamic})")
    print(f"max abs difference against the eager plan: {result.verification.max_diff:.3g}")
    print(check.verdict())
    print(format_table(result.verification.latency_rows()))
    return EXIT_FAILED if check.within_limit is False else EXIT_OK


def cmd_optimize(args: argparse.Namespace) -> int:
    import optuna

    from precsearch.report.outputs import check_writable, output_directory, write_results
    from precsearch.report.summary import format_table
    from precsearch.runtime.plan import mask_password
    from precsearch.runtime.precisions import FP32
    from precsearch.search.loop import optimize
    from precsearch.search.storage import open_storage

    request = _search_request(args)   # everything but the model-dependent fidelity, before the model is built
    out = request.out
    check_writable(out)
    open_storage(args.storage)  # a bad URL fails before the model is built
    model, data, device, model_spec = _model_and_data(args, training=request.config.training)
    config = request.config_for(model, data, device)
    storage, study_name = config.storage, config.study_name
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"precsearch: searching {model_spec} on {device} ({config.mode}): {_limits_text(config)}, "
          f"{args.trials} trials, study {study_name!r} in {mask_password(storage)}", file=sys.stderr)
    unseen = _unseen_data_line(config, len(data))
    if unseen:
        print(f"precsearch: {unseen}", file=sys.stderr)
    try:
        with output_directory(out):
            result = optimize(model, data, config)
            files = write_results(out, result)
    except KeyboardInterrupt:
        print(f"precsearch: interrupted; every finished trial is kept in {mask_password(storage)}: "
              f"rerun the same command to resume", file=sys.stderr)
        return 130
    if result.set_up_here:
        print(f"precsearch: this worker set up study {study_name!r} (sensitivity, probes, seeds)", file=sys.stderr)
    if result.plan is None:
        print(f"precsearch: {_no_plan_text(config, result)}", file=sys.stderr)
        return EXIT_FAILED
    if result.plan.default == FP32 and not result.plan.layers:
        print("precsearch: no plan ran faster than FP32 in the final race on this machine: plan.yaml keeps "
              "every unit in fp32", file=sys.stderr)
    print(format_table(result.summary()))
    for line in _error_lines(result.plan) + _generation_lines(result.plan):
        print(line)
    print(f"\nplan: {files['plan']}   report: {files['html']}   trials: {files['csv']}\n"
          f"other Pareto-optimal plans: {len(result.pareto)} in {files['pareto']}/")
    return EXIT_OK


def _limits_text(config: Any) -> str:
    """``rel_l2 <= 0.01, weight memory <= 40 MB``: every limit the search holds a plan to."""
    fidelity = config.fidelity
    limit = f"{fidelity.name} <= {fidelity.limit:g}" if fidelity else f"{_metric_name(config)} <= {config.max_error:g}"
    limit += f", {config.memory.text()}" if config.memory else ""
    return limit + (f", generated tokens agree with FP32's >= {config.min_token_agreement:g}; timed: "
                    f"{config.run.describe()}" if config.run.generates else "")


def _metric_name(config: Any) -> str:
    return "grad_rel_l2" if config.training else config.metric


def _no_plan_text(config: Any, result: Any) -> str:
    """Why no plan was chosen: the limits, the trials, and the shortfall or the riskiest units."""
    limit = config.fidelity.limit if config.fidelity else config.max_error
    within = f" with --margin {config.margin:g} ({_metric_name(config)} <= {limit * (1 - config.margin):.4g})" \
        if config.margin else ""
    compiled = " compiled" if config.compile else ""
    risky = ", ".join(f"{name or '<root>'} in {dtype} (~{error:.2g})"
                      for name, dtype, error in result.decisions.most_sensitive(3))
    why = result.shortfall() or f"most sensitive: {risky}. Loosen the limit or add trials"
    return f"no plan meets {_limits_text(config)}{within}{compiled} in {len(result.study.trials)} trials; {why}."


def _search_request(args: argparse.Namespace) -> Any:
    """``optimize``'s options as a ``SearchRequest``, checked."""
    from precsearch.search.request import SearchRequest

    return SearchRequest.of(
        model=args.model, study=args.study, out=args.out, storage=args.storage, loss=args.loss,
        metric_name=args.metric_name, metric=args.metric, max_drop=args.max_drop, max_rel_drop=args.max_rel_drop,
        holdout_data=args.holdout_data, space=args.space, strategy=args.strategy, max_error=args.max_error,
        mode=args.mode, trials=args.trials, timeout=args.timeout, seed=args.seed, heartbeat=args.heartbeat,
        weights=args.weights, compile=args.compile, holdout=args.holdout, margin=args.margin,
        max_weight_mb=args.max_weight_mb, max_peak_mb=args.max_peak_mb, workload=args.workload,
        new_tokens=args.new_tokens, min_token_agreement=args.min_token_agreement)


def _error_lines(plan: Any) -> list[str]:
    """The chosen plan's errors beyond the search's own: compiled, and on held-out batches."""
    metrics, constraint = plan.measured, plan.constraint
    name, limit = (constraint.metric, constraint.limit) if constraint is not None else ("error", None)
    lines = []
    if metrics.compiled_error is not None:
        lines.append(f"compiled: {name} {metrics.compiled_error:.4g} against FP32 (limit {limit:g})")
    if metrics.holdout_error is not None:
        search_error = metrics.error if metrics.error is not None else 0.0
        lines.append(f"held out: {name} {metrics.holdout_error:.4g} on {metrics.holdout_batches} batches "
                     f"the search never saw (search error {search_error:.4g}, limit {limit:g})")
    return lines


def _generation_lines(plan: Any) -> list[str]:
    """A generating plan's prefill, decode and tokens/s beside FP32's, and its token agreement."""
    metrics, runtime = plan.metrics, plan.resolved_runtime
    if not runtime.run.generates or metrics is None or not metrics.generates:
        return []
    decode = metrics.decode_ms_per_token
    minimum = plan.constraint.min_token_agreement if plan.constraint is not None else None
    agreement = metrics.token_agreement
    form = "compiled, static cache" if runtime.compile else "eager"
    line = (f"generation ({runtime.new_tokens} new tokens, {form}): prefill {metrics.prefill_ms:.4g} ms, decode "
            f"{'-' if decode is None else format(decode, '.4g')} ms/token, {metrics.tokens_per_s} tokens/s "
            f"(FP32 {metrics.baseline_tokens_per_s} tokens/s); greedy tokens agree with FP32's "
            f"{'-' if agreement is None else format(agreement, '.3g')}"
            f"{'' if minimum is None else f' (min {minimum:g})'}")
    return [line]


def _unseen_data_line(config: Any, batches: int) -> str | None:
    """What the search holds out and the headroom it keeps, in one line (None: neither)."""
    if config.holdout_data is not None:
        held = f"{len(config.holdout_data)} held-out batches from --holdout-data score the plans"
    else:
        count = config.holdout_count(batches)
        held = (f"{count} of {batches} batches held out (--holdout {config.holdout_fraction(batches):g}) to score "
                f"the plans" if count else "")
    margin = f"--margin {config.margin:g} keeps headroom under the limit" if config.margin else ""
    return "; ".join(part for part in (held, margin) if part) or None


def cmd_report(args: argparse.Namespace) -> int:
    from precsearch.report.summary import open_study, write_report

    files = write_report(args.dir, open_study(args.dir, args.storage, args.study))
    print("\n".join(f"{kind:>8}: {path}" for kind, path in files.items()))
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from precsearch.report.compare import compare_plans, differences_line
    from precsearch.report.summary import format_table

    model, data = None, None
    if args.model or args.data:
        model, data, _, _ = _model_and_data(args)  # in eval mode: plans are measured for inference
    result = compare_plans([Path(p) for p in args.plans], model, data, compiled=args.compile)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return EXIT_OK
    for note in result.warnings:
        _warn(note)
    print(format_table(result.summary))
    if not result.units_known:
        print(f"(dtype counts over the {len(result.units)} units the plans name; add --model/--data for all units)")
    if len(set(result.defaults.values())) > 1:
        print("\ndefaults differ (units a plan does not name run in its default): "
              + ", ".join(f"{name} {default}" for name, default in result.defaults.items()))
    print("\n" + differences_line(result.differences, result.units, result.units_known)
          + (":" if result.differences else ""))
    if result.differences:
        print(format_table(result.differences, max_rows=40))
    if result.remeasured:
        form = "compiled (speedups against compiled FP32)" if args.compile else "eager"
        print(f"\nre-measured on this machine in eval mode, interleaved in one run, {form}:")
        print(format_table(result.remeasured))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from precsearch.runtime.accuracy import METRICS
    from precsearch.runtime.workload import DEFAULT_MIN_TOKEN_AGREEMENT, DEFAULT_NEW_TOKENS, WORKLOADS

    parser = _Parser(prog="precsearch", description=(
        "Find, per layer of a PyTorch model, the fastest precision (fp8, fp16, bf16, fp32) that keeps "
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
                                            "eligible op computed in. Exit 1 on any mismatch. Inference plans "
                                            "run the model in eval mode (model.eval()), training plans in "
                                            "train mode.")
    check.add_argument("--plan", required=True, metavar="PLAN.yaml", help="the plan to check")
    _add_model_args(check)
    check.add_argument("--json", action="store_true", help="machine-readable result")
    check.add_argument("--loss", metavar="MODULE:FUNC",
                       help="training plans: the loss FUNC(output, target) for the backward pass "
                            "(default: cross entropy)")
    check.add_argument("--compile", action="store_true",
                       help="also compile the plan with torch.compile and check the compiled model's error "
                            "against FP32 (in eval mode) stays within the plan's limit; exit 1 when it is over "
                            "the limit or the model cannot run compiled (the audit itself runs eager)")
    _add_fingerprint_arg(check)
    check.add_argument("--package", metavar="MODEL.pt2",
                       help="instead of the audit, run this AOTInductor package (precsearch export) on the data "
                            "and check its error against the FP32 model stays within the plan's limit; exit 1 "
                            "over the limit")
    check.set_defaults(run=cmd_check)

    export = commands.add_parser(
        "export", help="write the model with a plan applied as an AOTInductor package (.pt2)",
        description="Apply an inference plan (low weights held, eval mode), export the model with torch.export "
                    "(non-strict) and compile it with AOTInductor into one .pt2 file that "
                    "torch._inductor.aoti_load_package runs with torch alone. Then verify it on the data: its "
                    "largest output difference against the eager plan, its error against FP32 (exit 1 over the "
                    "plan's limit) and its latency beside eager FP32 and the eager plan. A model that cannot be "
                    "exported is bad input (exit 2) and leaves no file.")
    export.add_argument("--plan", required=True, metavar="PLAN.yaml", help="the inference plan to apply")
    _add_model_args(export)
    export.add_argument("--out", required=True, metavar="MODEL.pt2", help="the package to write")
    export.add_argument("--dynamic", action="store_true",
                        help="export the batch dimension (and the second one, e.g. the sequence, where inputs "
                             "have one) as dynamic where the model allows; if it does not, one warning and a "
                             "static export")
    _add_fingerprint_arg(export)
    export.set_defaults(run=cmd_export)

    search = commands.add_parser(
        "optimize", help="search the fastest per-layer precision plan within an accuracy limit",
        description="Search, with Optuna, the fastest per-unit precision plan whose error against the "
                    "FP32 model stays within the limit. Writes plan.yaml, trials.csv and pareto/ to --out. "
                    "Rerunning the same command resumes the study. Inference searches run the model in "
                    "eval mode (model.eval()).")
    _add_model_args(search)
    search.add_argument("--space", default="default", metavar="NAME|PATH",
                        help="search space: a named one (default, transformer, cnn, bf16_only) or a YAML file")
    search.add_argument("--metric-name", default=None, choices=list(METRICS), metavar="NAME",
                        help="fidelity metric against the FP32 outputs: " + "; ".join(
                            f"{m.name}: {m.help}" for m in METRICS.values()) + " (default: rel_l2; for hf:DIR "
                        "the checkpoint task's metric: label_accuracy for a classifier with labels, else top1; "
                        "perplexity for a causal LM; token_agreement for seq2seq and token classification; "
                        "embedding_cosine for feature extraction)")
    search.add_argument("--max-error", type=_number, default=0.01, metavar="X",
                        help="largest allowed --metric-name value (default: 0.01)")
    search.add_argument("--max-weight-mb", type=_positive, metavar="X",
                        help="memory budget beside the accuracy limit: a plan is feasible only when the model's "
                             "weights as it runs (low units' weights held low) take at most X MB (2**20 bytes); "
                             "inference with --weights low (default: no budget)")
    search.add_argument("--max-peak-mb", type=_positive, metavar="X",
                        help="a plan is feasible only when the device's peak memory while it runs is at most X MB; "
                             "CUDA only (the CPU does not report peak memory)")
    search.add_argument("--metric", metavar="MODULE:FUNC",
                        help="your metric FUNC(model, batches) -> float, higher is better")
    search.add_argument("--max-drop", type=_number, metavar="X", help="largest allowed absolute drop of --metric")
    search.add_argument("--max-rel-drop", type=_number, metavar="X",
                        help="largest allowed relative drop of --metric")
    search.add_argument("--trials", type=_positive_int, default=60, metavar="N",
                        help="total trials in the study (default: 60)")
    search.add_argument("--timeout", type=_number, metavar="SECONDS", help="stop after this long")
    search.add_argument("--mode", choices=["infer", "train", "inference", "training"], default="infer",
                        metavar="infer|train",
                        help="time inference, or full training steps on (inputs, target) batches with the "
                             "gradients' rel_l2 against FP32 as the constraint (default: infer)")
    search.add_argument("--weights", choices=["low", "fp32"], default=None,
                        help="inference: hold each low unit's weights in its dtype, as deployed (low, the "
                             "default), or keep FP32 weights cast on every call (fp32); training is always fp32")
    search.add_argument("--compile", action="store_true",
                        help="inference: race the finalists compiled with torch.compile, as deployed (trials "
                             "run eager); a finalist whose compiled error is over the limit is dropped, and "
                             "the plan records runtime.compile: true and metrics.compiled_error. If the compiled "
                             "race fails, one warning, and the plan is eager (runtime.compile: false)")
    search.add_argument("--workload", choices=list(WORKLOADS), default="forward", metavar="forward|generate",
                        help="what one timed run of a candidate is: " + "; ".join(
                            f"{name}: {text}" for name, text in WORKLOADS.items()) + " (default: forward). "
                        "generate also holds each plan to --min-token-agreement; with --compile it generates "
                        "with a static KV cache and a compiled decode step")
    search.add_argument("--new-tokens", type=_positive_int, default=None, metavar="N",
                        help=f"--workload generate: tokens each run generates (default: {DEFAULT_NEW_TOKENS})")
    search.add_argument("--min-token-agreement", type=_fraction_or_one, default=None, metavar="X",
                        help=f"--workload generate: a plan is feasible only when at least this fraction of its "
                             f"greedy tokens on --data equal FP32's at the same position (default: "
                             f"{DEFAULT_MIN_TOKEN_AGREEMENT})")
    search.add_argument("--holdout", type=_fraction, default=None, metavar="FRACTION",
                        help="share of the batches the search never sees, used to score the chosen and the "
                             "Pareto plans (metrics.holdout_error). Default: 0.25 with 8 batches or more, else 0 "
                             "(with fewer, every batch is needed for the search's own error estimate)")
    search.add_argument("--holdout-data", metavar="MODULE:FUNC",
                        help="held-out batches from a factory, instead of --holdout")
    search.add_argument("--margin", type=_fraction, default=0.0, metavar="M",
                        help="headroom: choose the fastest plan whose search error is at most "
                             "max-error * (1 - M) (default: 0)")
    search.add_argument("--loss", metavar="MODULE:FUNC",
                        help="training loss FUNC(output, target) -> scalar (default: cross entropy)")
    search.add_argument("--storage", metavar="URL",
                        help="sqlite:///PATH, journal:///PATH or postgresql://... (default: OUT/study.db)")
    search.add_argument("--study", metavar="NAME", help="study name (default: from the model factory)")
    search.add_argument("--out", metavar="DIR", help="output directory (default: reports/STUDY/)")
    search.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    strategies = _strategy_help()
    search.add_argument("--strategy", default="optuna", choices=list(strategies) or None, metavar="NAME",
                        help="; ".join(f"{name}: {text}" for name, text in strategies.items()))
    search.add_argument("--heartbeat", type=_number, default=60, metavar="SECONDS",
                        help="how often a worker tells the storage it is alive; a trial silent for twice this "
                             "is failed and re-queued (default: 60)")
    search.set_defaults(run=cmd_optimize)

    report = commands.add_parser("report", help="write report.md/.html, plots and trials.csv for a search",
                                 description="Rebuild the report of a search from its output directory.")
    report.add_argument("dir", metavar="DIR", help="an optimize --out directory")
    report.add_argument("--storage", metavar="URL", help="where the study is, if not DIR/study.db")
    report.add_argument("--study", metavar="NAME", help="which study, if the storage holds several")
    report.set_defaults(run=cmd_report)

    comparison = commands.add_parser(
        "compare", help="compare plans side by side (and re-measure them with --model/--data)",
        description="Show plans' recorded metrics and settings side by side and the units whose precision "
                    "differs. With --model and --data, re-measure every plan and the FP32 baseline on this "
                    "machine in one interleaved run.")
    comparison.add_argument("plans", nargs="+", metavar="PLAN.yaml", help="two or more plans")
    comparison.add_argument("--model", metavar="MODULE:FUNC|hf:DIR", help="re-measure on this model (with --data)")
    comparison.add_argument("--data", metavar="MODULE:FUNC|FILE", help="batches for the re-measurement")
    comparison.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    _add_data_file_args(comparison)
    comparison.add_argument("--json", action="store_true", help="machine-readable output")
    comparison.add_argument("--compile", action="store_true",
                            help="re-measure every plan and FP32 compiled with torch.compile, each on its own copy")
    comparison.set_defaults(run=cmd_compare)
    return parser


def _strategy_help() -> dict[str, str]:
    """``--strategy``'s names and their help; none without the search extra (``optimize`` then
    says that it needs it), so that the other commands run without it."""
    try:
        from precsearch.search.strategies import STRATEGIES
    except ModuleNotFoundError as error:
        if not _missing_search_extra(error):
            raise
        return {}
    return {strategy.name: strategy.help for strategy in STRATEGIES.values()}


def _positive(text: str) -> float:
    value = _number(text)
    return _required(value > 0, value, text, "a positive number")


def _number(text: str) -> float:
    import math

    value = _parsed(text, float, "a number")
    return _required(math.isfinite(value) and value >= 0, value, text, "a finite number >= 0")


def _fraction(text: str) -> float:
    value = _number(text)
    return _required(value < 1, value, text, "a fraction >= 0 and < 1")


def _fraction_or_one(text: str) -> float:
    value = _number(text)
    return _required(value <= 1, value, text, "a fraction from 0 to 1")


def _positive_int(text: str) -> int:
    value = _parsed(text, int, "an integer")
    return _required(value >= 1, value, text, "at least 1")


def _parsed(text: str, kind: Callable[[str], Any], noun: str) -> Any:
    """``text`` as ``kind`` (int, float), or the usage error ``'x' is not a number``."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None


def _required(holds: bool, value: Any, text: str, requirement: str) -> Any:
    """``value`` when it ``holds``, else the usage error ``'x' must be <requirement>``."""
    if not holds:
        raise argparse.ArgumentTypeError(f"{text!r} must be {requirement}")
    return value


def _warn(message: str) -> None:
    """One warning line on stderr, written by the CLI itself: no warnings filter can hide it."""
    print(f"precsearch: warning: {str(message).splitlines()[0] if str(message) else 'warning'}", file=sys.stderr)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _warn(str(message))


def main(argv: list[str] | None = None) -> int:
    import warnings

    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        # precsearch's own warnings are part of its output: -W and PYTHONWARNINGS (ignore, error)
        # keep ruling other libraries' warnings only. "default": each one once per place it is issued.
        warnings.filterwarnings("default", module=r"precsearch(\.|$)")
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args: argparse.Namespace | None = None
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
    except Exception as error:  # a bug, not bad input: one line, the traceback on request
        if _missing_search_extra(error):
            print(f"precsearch: error: {getattr(args, 'command', None)!r} needs the search extra: "
                  f"pip install 'precsearch[search]'", file=sys.stderr)
            return EXIT_BAD_INPUT
        if os.environ.get("PRECSEARCH_DEBUG"):
            raise
        print(f"precsearch: internal error: {described(error)} "
              f"(rerun with PRECSEARCH_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return EXIT_FAILED


def _missing_search_extra(error: BaseException) -> bool:
    """Whether ``error`` is a package of the search extra that is not installed."""
    return isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in SEARCH_EXTRA


if __name__ == "__main__":
    sys.exit(main())
