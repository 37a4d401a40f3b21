"""Search overhead at 300+ units: the time of a trial spent outside model evaluation (sampling,
storage, bookkeeping), for both parametrisations, and the graph walker's time.

    python benchmarks/search_overhead.py
"""

from __future__ import annotations

import json
import time

import optuna
import torch

from precsearch import walk
from precsearch.search.config import SearchConfig
from precsearch.search.evaluate import Evaluator
from precsearch.search.trials import TrialRecord
from precsearch.search.loop import optimize

optuna.logging.set_verbosity(optuna.logging.WARNING)


def overhead() -> dict:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=48, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model = BertModel(config).eval()
    batches = [{"input_ids": torch.randint(0, 512, (2, 16))}]
    started = time.perf_counter()
    graph = walk(model, batches[0])
    walk_s = time.perf_counter() - started

    results = {"units": len(graph), "walker_s": round(walk_s, 2), "walker_method": graph.method}
    for label, max_categorical in (("ranked", 48), ("categorical", 10_000)):
        spent: list[tuple[float, float]] = []  # (start, seconds) of each model evaluation
        real = Evaluator.measure

        def timed(self, layers, real=real, spent=spent, **options):
            begin = time.time()
            try:
                return real(self, layers, **options)
            finally:
                spent.append((begin, time.time() - begin))

        Evaluator.measure = timed
        try:
            trials = 30
            started = time.perf_counter()
            result = optimize(model, batches, SearchConfig(trials=trials, progress=False, repeats=3,
                              max_categorical=max_categorical, drop_slow_dtypes=False))
            total = time.perf_counter() - started
        finally:
            Evaluator.measure = real
        finished = [t for t in result.study.trials if t.datetime_complete]
        durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in finished]
        first, last = finished[0].datetime_start.timestamp(), finished[-1].datetime_complete.timestamp()
        evaluated = [seconds for begin, seconds in spent if first <= begin <= last]  # not probes, not the final re-run
        results[label] = {
            "trials": trials, "search_s": round(total, 2),
            "per_trial_ms": round(1e3 * sum(durations) / len(durations), 1),
            "per_trial_model_evaluation_ms": round(1e3 * sum(evaluated) / len(durations), 1),
            "distinct_plans": len({TrialRecord.of(t, result.graph.units).code for t in finished}),
            "per_trial_overhead_ms": round(1e3 * (sum(durations) - sum(evaluated)) / len(durations), 1),
        }
    return results


if __name__ == "__main__":
    print(json.dumps(overhead(), indent=2))
