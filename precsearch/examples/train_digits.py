"""Train scikit-learn's digits with a searched mixed-precision plan, next to FP32 from the same
seed, in a plain PyTorch loop::

    python -m precsearch.examples.train_digits [--epochs 12] [--trials 12]

The middle layers are held to FP16 (so loss scaling is on even on a CPU, where the search
would otherwise leave FP16 out as slow); the search picks BF16 or FP32 for the others.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from precsearch.search.config import SearchConfig
from precsearch.examples import digits
from precsearch.search.loop import optimize
from precsearch.search.space import SearchSpace
from precsearch.runtime.training import Trainer, default_loss

SPACE = SearchSpace.parse({"format": "precsearch-space/1", "name": "digits-fp16", "rules": [
    {"name": "^fc[23]$", "dtypes": ["fp16"]}, {"name": ".", "dtypes": ["bf16", "fp32"]}]}, "train_digits")


def run(epochs: int = 12, trials: int = 12, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    start = digits.DigitsMLP()
    state = {key: value.clone() for key, value in start.state_dict().items()}
    plan = optimize(start, digits.training_data()[:4], SearchConfig(space=SPACE, mode="training", max_error=0.05,
                    trials=trials, progress=False, repeats=3)).plan
    if plan is None:
        raise RuntimeError(f"no training plan within max_error 0.05 in {trials} trials: give more trials")

    results: dict[str, Any] = {"plan": plan}
    for name in ("fp32", "plan"):
        model = digits.DigitsMLP()
        model.load_state_dict(state)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        torch.manual_seed(seed + 1)
        if name == "fp32":
            for _ in range(epochs):
                for inputs, target in digits.training_data():
                    optimizer.zero_grad()
                    default_loss(model(inputs), target).backward()
                    optimizer.step()
        else:
            # The three lines a training loop needs to adopt a plan:
            with Trainer(model, plan, optimizer) as trainer:
                for _ in range(epochs):
                    for inputs, target in digits.training_data():
                        trainer.step(inputs, target)
            results["scales"], results["skipped"] = trainer.scales, trainer.skipped
        with torch.no_grad():
            results[f"{name}_accuracy"] = digits.accuracy(model.eval(), digits.data())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="Train digits in FP32 and with a searched plan; compare.")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--trials", type=int, default=12)
    options = parser.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = run(options.epochs, options.trials)
    plan = result["plan"]
    print("plan:", {unit: plan.precision(unit) for unit in ("fc1", "fc2", "fc3", "out")})
    print(f"test accuracy  fp32: {result['fp32_accuracy']:.4f}   plan: {result['plan_accuracy']:.4f}   "
          f"difference: {100 * (result['plan_accuracy'] - result['fp32_accuracy']):+.2f} pp")
    scales = result["scales"]
    print(f"loss scale: {scales[0]:g} -> {scales[-1]:g}, {result['skipped']} steps skipped of {len(scales)}")


if __name__ == "__main__":
    main()
