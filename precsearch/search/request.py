"""A search asked for by names, as ``precsearch optimize`` gives it: factory specs, an output
folder, a study name, a metric factory.

>>> request = SearchRequest.of(model="zoo.nets:resnet", space="cnn", max_error=0.02)   # doctest: +SKIP
>>> request.out, request.config.study_name                                            # doctest: +SKIP
(PosixPath('reports/nets-resnet'), 'nets-resnet')
>>> config = request.config_for(model, batches, "cpu")                                # doctest: +SKIP

``SearchRequest.of`` checks everything that does not need the model, before it is built;
``config_for`` finishes the config once the model and its batches are loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from precsearch.runtime import hf
from precsearch.runtime.accuracy import Fidelity, task_metric
from precsearch.runtime.batches import to_device
from precsearch.runtime.errors import InputError
from precsearch.runtime.ops import device_type_of
from precsearch.search import factories
from precsearch.search.config import SearchConfig


@dataclasses.dataclass(frozen=True)
class SearchRequest:
    """The config as far as it is known before the model is built, and the names the rest
    needs: ``metric_name`` (None: the checkpoint task's metric for ``hf:DIR``, else rel_l2),
    ``metric_spec`` (``--metric MODULE:FUNC``, higher is better, bounded by ``max_drop`` or
    ``max_rel_drop``) and ``holdout_spec`` (``--holdout-data MODULE:FUNC``)."""

    config: SearchConfig
    model_spec: str
    out: Path
    metric_name: str | None = None
    metric_spec: str | None = None
    max_drop: float | None = None
    max_rel_drop: float | None = None
    holdout_spec: str | None = None

    @classmethod
    def of(cls, *, model: str | None = None, study: str | None = None, out: str | None = None,
           storage: str | None = None, loss: str | None = None, metric_name: str | None = None,
           metric: str | None = None, max_drop: float | None = None, max_rel_drop: float | None = None,
           holdout_data: str | None = None, **settings: Any) -> SearchRequest:
        """The request, checked. ``settings`` are ``SearchConfig``'s fields, with the space and the
        strategy by name (``SearchConfig.from_names``). Defaults: the built-in demo model, a study
        named after the model, ``reports/STUDY/`` and its ``study.db``."""
        config = SearchConfig.from_names(metric=metric_name or "rel_l2",
                                         loss_fn=factories.resolve(loss, "loss") if loss else None,
                                         progress=True, **settings)
        model_spec = model or factories.DEMO_MODEL
        study_name = study or study_name_for(model_spec)
        folder = Path(out or Path("reports") / study_name)
        config = dataclasses.replace(config, storage=storage or f"sqlite:///{folder / 'study.db'}",
                                     study_name=study_name, model_name=model_spec)
        return cls(config, model_spec, folder, metric_name, metric, max_drop, max_rel_drop, holdout_data)

    def config_for(self, model: nn.Module, batches: list[Any], device: str) -> SearchConfig:
        """The config for the loaded model: its workload and memory limits checked against the
        model and the device, its metric (the ``--metric`` factory, or the default metric) and
        the held-out batches on the device."""
        self.config.run.check(model, batches[0])   # --workload generate needs a language model and token batches
        self.config.memory.check_device(device_type_of(device))   # --max-peak-mb needs a device that reports peaks
        fidelity = self._user_fidelity(model, batches)
        metric = self.metric_name or default_metric(self.model_spec, model, batches)
        return dataclasses.replace(self.config, metric=metric, fidelity=fidelity,
                                   holdout_data=self._holdout_batches(device))

    def _user_fidelity(self, model: nn.Module, batches: list[Any]) -> Fidelity | None:
        """The ``--metric M:F`` constraint, or None for a built-in metric."""
        if self.metric_spec:
            function = factories.resolve(self.metric_spec, "metric")
            return Fidelity.user(model, batches, function, self.metric_spec, max_drop=self.max_drop,
                                 max_rel_drop=self.max_rel_drop)
        if self.max_drop is not None or self.max_rel_drop is not None:
            raise InputError("--max-drop/--max-rel-drop bound a --metric M:F; use --max-error with --metric-name")
        return None

    def _holdout_batches(self, device: str) -> list[Any] | None:
        """The ``--holdout-data`` batches on the device, or None."""
        if not self.holdout_spec:
            return None
        return [to_device(batch, device) for batch in factories.load_data(self.holdout_spec, "holdout-data")]


def study_name_for(model_spec: str) -> str:
    """``"precsearch.examples.demo:model"`` -> ``"demo"``; ``"zoo.nets:resnet"`` -> ``"nets-resnet"``;
    ``"hf:ckpt/bert"`` -> ``"hf-bert"``."""
    if hf.is_checkpoint(model_spec):
        return hf.study_name(model_spec)
    module, _, function = model_spec.partition(":")
    stem = module.rsplit(".", 1)[-1]
    return stem if function == "model" else f"{stem}-{function}"


def default_metric(model_spec: str, model: nn.Module, batches: list[Any]) -> str:
    """The default ``--metric-name``: the checkpoint's task metric for ``hf:DIR``, else rel_l2."""
    return task_metric(hf.task_of(model), batches) if hf.is_checkpoint(model_spec) else "rel_l2"
