"""What one timed run of a candidate is: the workload a plan is measured under and deployed for.

``forward``: one forward pass on the first batch (the default). ``generate``: greedy generation
of ``new_tokens`` tokens with the model's KV cache (prefill + ``new_tokens - 1`` decode steps)
through ``model.generate``, for causal and seq2seq language models. A generating candidate is
also judged by the tokens it generates: the fraction identical to FP32's greedy output
(``TokenGate``, against FP32 tokens generated once).

>>> workload = Workload("generate", new_tokens=32)                     # doctest: +SKIP
>>> run = workload.runner(model, batch)      # timed by precsearch.search.bench like any run
>>> run(); run.stats().decode_ms_per_token                             # doctest: +SKIP

Compiled, generation uses a static cache (``cache_implementation="static"``), so that the
decode step compiles once for every step; transformers compiles the decode step and runs the
prefill eager (``Workload.compile``).

transformers is imported only when a model generates.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, TypedDict, cast

import torch
from torch import nn

from precsearch.runtime import batches as _batches
from precsearch.runtime.errors import InputError

FORWARD, GENERATE = "forward", "generate"
WORKLOADS = {FORWARD: "one forward pass on the first batch",
             GENERATE: "greedy generation of --new-tokens tokens with the KV cache (prefill + decode steps), "
                       "for causal and seq2seq language models"}
GENERATIVE_TASKS = ("causal-lm", "seq2seq-lm")
DEFAULT_NEW_TOKENS = 32
DEFAULT_MIN_TOKEN_AGREEMENT = 0.9
PROMPT_INPUTS = ("input_ids", "attention_mask")   # what a prompt keeps of a batch (no teacher-forced decoder input)


class GenerationRecord(TypedDict, total=False):
    """What a trial stores of a generating candidate (``GenerationStats.record``: every key;
    ``{}`` for a candidate that does not generate)."""

    prefill_ms: float
    decode_ms_per_token: float | None
    tokens_per_s: float | None
    generated_tokens: int
    token_agreement: float | None


class GenerationPlanMetrics(GenerationRecord, total=False):
    """A plan's generation metrics (``GenerationStats.plan_metrics``)."""

    baseline_tokens_per_s: float | None


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    """One generating candidate, timed: the medians of its runs' prefill (up to the first new
    token) and decode time per later token, and the tokens one run generates (batch x new tokens).
    ``token_agreement``: the fraction of its greedy tokens identical to FP32's, where judged."""

    prefill_ms: float
    decode_ms_per_token: float | None   # None with one new token: there is no decode step
    tokens: int
    total_ms: float
    token_agreement: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens * 1e3 / self.total_ms if self.total_ms > 0 else float("nan")

    def record(self) -> GenerationRecord:
        """The numbers a trial stores (``records.TrialRecord``)."""
        return {"prefill_ms": round(self.prefill_ms, 4),
                "decode_ms_per_token": None if self.decode_ms_per_token is None else round(self.decode_ms_per_token, 4),
                "tokens_per_s": round(self.tokens_per_s, 2), "generated_tokens": self.tokens,
                "token_agreement": self.token_agreement}

    def plan_metrics(self, latency_ms: float, baseline_ms: float) -> GenerationPlanMetrics:
        """The plan's generation metrics: tokens/s on the plan's latency basis (the study's FP32
        baseline over the measured speedup), so that they agree with ``latency_ms``."""
        return {**self.record(),
                "tokens_per_s": round(self.tokens * 1e3 / latency_ms, 2) if latency_ms > 0 else None,
                "baseline_tokens_per_s": round(self.tokens * 1e3 / baseline_ms, 2) if baseline_ms > 0 else None}

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> GenerationStats | None:
        """From a trial's or a plan's numbers (``record``); None when they hold no generation."""
        if values.get("prefill_ms") is None or not values.get("generated_tokens"):
            return None
        tokens = int(values["generated_tokens"])
        per_second = values.get("tokens_per_s")
        total = tokens * 1e3 / per_second if per_second else float("nan")
        return cls(values["prefill_ms"], values.get("decode_ms_per_token"), tokens, total,
                   values.get("token_agreement"))


@dataclasses.dataclass(frozen=True)
class Workload:
    """What a timed run is (``WORKLOADS``); ``new_tokens`` for ``generate`` (default 32)."""

    name: str = FORWARD
    new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise InputError(f"--workload {self.name!r}: use one of {', '.join(WORKLOADS)}")
        if self.name == FORWARD:
            if self.new_tokens is not None:
                raise InputError("--new-tokens: applies to --workload generate")
            return
        tokens = DEFAULT_NEW_TOKENS if self.new_tokens is None else self.new_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise InputError(f"--new-tokens {self.new_tokens!r}: must be an integer >= 1")
        object.__setattr__(self, "new_tokens", tokens)

    @property
    def generates(self) -> bool:
        return self.name == GENERATE

    def describe(self) -> str:
        return f"generate {self.new_tokens} tokens" if self.generates else "forward"

    def check(self, model: nn.Module, batch: Any) -> None:
        """The model and the data can run this workload, or one InputError line saying why."""
        if not self.generates:
            return
        from precsearch.runtime.hf import task_of

        if task_of(model) not in GENERATIVE_TASKS or not callable(getattr(model, "generate", None)):
            raise InputError(f"--workload generate: {type(model).__name__} is not a causal or seq2seq language "
                             f"model (a transformers ...ForCausalLM, ...LMHeadModel or ...ForConditionalGeneration); "
                             f"use --workload forward")
        prompt_of(model, batch)

    def runner(self, model: Any, batch: Any) -> Callable[[], None]:
        """One run of ``model`` on ``batch``, for ``bench.time_interleaved``: a forward pass under
        ``no_grad``, or a ``GenerationRun`` (which also times its prefill and decode steps)."""
        if self.generates:
            return GenerationRun(model, prompt_of(model, batch), self.new_tokens)  # type: ignore[arg-type]
        return _batches.forward_runner(model, batch)

    def compile(self, model: nn.Module) -> Any:
        """``model`` as it runs compiled: ``torch.compile(model)``, or, generating, the model
        itself with a static KV cache and a compiled decode step (the prefill stays eager, as in
        transformers: its shapes differ from every decode step's)."""
        if not self.generates:
            return torch.compile(model)
        import transformers

        config = copy.deepcopy(cast("transformers.GenerationConfig", model.generation_config))
        config.cache_implementation = "static"
        config.compile_config = transformers.CompileConfig(fullgraph=False, dynamic=False, mode="default")
        config.compile_config._compile_all_devices = True   # transformers compiles on GPUs only unless told
        model.generation_config = config  # type: ignore[assignment]  # torch types attributes Tensor | Module
        return model

    def plan_fields(self) -> dict[str, Any]:
        """What a plan's ``runtime`` records of this workload (nothing for ``forward``)."""
        return {"workload": self.name, "new_tokens": self.new_tokens} if self.generates else {}


def prompt_of(model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
    """The generation prompt in a token batch: its ``input_ids`` and ``attention_mask``. A causal
    LM continues each row from its last token, so its rows are padded on the left (a tokenizer
    pads on the right by default): the tokens keep their order, the padding moves in front."""
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
        raise InputError("--workload generate: needs token batches (dicts with input_ids), e.g. --data FILE "
                         "with --model hf:DIR")
    prompt = {key: batch[key] for key in PROMPT_INPUTS if isinstance(batch.get(key), torch.Tensor)}
    mask = prompt.get("attention_mask")
    if mask is not None and not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        order = torch.argsort(mask.long(), dim=1, stable=True)   # padding (0) first, tokens in order
        prompt = {key: value.gather(1, order) for key, value in prompt.items()}
    return prompt


def generation_config(model: Any, new_tokens: int) -> Any:
    """The model's own generation config (static cache and compiled decode when ``compile``
    set them), made greedy and exactly ``new_tokens`` long: end-of-sequence is not generated
    before that, so every candidate generates the same number of tokens."""
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = config.min_new_tokens = new_tokens
    config.do_sample, config.num_beams = False, 1
    config.temperature = config.top_p = config.top_k = None
    if config.pad_token_id is None:
        eos = config.eos_token_id
        config.pad_token_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    return config


class _Clock:
    """A transformers streamer that notes when the first new token is out (the prefill's end)."""

    def __init__(self, device_type: str) -> None:
        self.device_type, self.calls = device_type, 0
        self.first_token: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:   # the first call is the prompt
            if self.device_type == "cuda":
                torch.cuda.synchronize()
            self.first_token = time.perf_counter()

    def end(self) -> None:
        pass


class GenerationRun:
    """One greedy generation of ``new_tokens`` tokens, callable as a run; each call also notes
    its prefill and decode times (``stats``)."""

    def __init__(self, model: Any, prompt: dict[str, torch.Tensor], new_tokens: int) -> None:
        from precsearch.runtime.ops import model_device_type

        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens
        self.device_type = model_device_type(model)
        self.config = generation_config(model, new_tokens)
        self.samples: list[tuple[float, float]] = []   # (prefill ms, total ms) of each call

    def generate(self, streamer: Any = None) -> torch.Tensor:
        """The new tokens, ``(batch, new_tokens)``."""
        with torch.no_grad():
            output: torch.Tensor = self.model.generate(**self.prompt, generation_config=self.config,
                                                       streamer=streamer)
        return output[:, -self.new_tokens:]

    def __call__(self) -> None:
        clock = _Clock(self.device_type)
        started = time.perf_counter()
        self.generate(clock)
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        ended = time.perf_counter()
        first = clock.first_token or ended
        self.samples.append(((first - started) * 1e3, (ended - started) * 1e3))

    def stats(self, last: int | None = None, token_agreement: float | None = None) -> GenerationStats | None:
        """Medians over the ``last`` calls (all, by default); None before any call."""
        samples = self.samples[-last:] if last else self.samples
        if not samples:
            return None
        decode = (statistics.median((total - prefill) / (self.new_tokens - 1) for prefill, total in samples)
                  if self.new_tokens > 1 else None)
        tokens = int(self.prompt["input_ids"].shape[0]) * self.new_tokens
        return GenerationStats(statistics.median(p for p, _ in samples), decode, tokens,
                               statistics.median(t for _, t in samples), token_agreement)


def stats_of(run: Any, last: int | None = None, token_agreement: float | None = None) -> GenerationStats | None:
    """``run``'s generation stats, or None for a run that does not generate."""
    return run.stats(last, token_agreement) if isinstance(run, GenerationRun) else None


def greedy_agreement(tokens: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The fraction of generated tokens identical to the reference's at the same position.

    >>> greedy_agreement([torch.tensor([[1, 2, 3, 4]])], [torch.tensor([[1, 2, 0, 4]])])
    0.75
    """
    same = total = 0
    for got, want in zip(tokens, reference, strict=True):
        if got.shape != want.shape:
            raise RuntimeError(f"generated {tuple(got.shape)} tokens, FP32 generated {tuple(want.shape)}")
        same += int((got == want.to(got.device)).sum())
        total += want.numel()
    return same / total if total else 1.0


class TokenGate:
    """The generation constraint: a candidate's greedy tokens on every batch must agree with
    FP32's (generated once, here) at least ``minimum`` of the time (``--min-token-agreement``)."""

    def __init__(self, model: nn.Module, batches: list[Any], workload: Workload, minimum: float) -> None:
        if isinstance(minimum, bool) or not isinstance(minimum, (int, float)) or not 0 <= minimum <= 1:
            raise InputError(f"--min-token-agreement {minimum!r}: must be a fraction between 0 and 1")
        self.batches, self.workload, self.minimum = batches, workload, float(minimum)
        self.reference = self.tokens(model)

    def tokens(self, model: Any) -> list[torch.Tensor]:
        """``model``'s greedy tokens on every batch."""
        return [GenerationRun(model, prompt_of(model, batch), self.workload.new_tokens).generate().cpu()  # type: ignore[arg-type]
                for batch in self.batches]

    def agreement(self, model: Any) -> float:
        return greedy_agreement(self.tokens(model), self.reference)

    def failure(self, agreement: float) -> str | None:
        """Why ``agreement`` makes a candidate infeasible, or None."""
        if agreement >= self.minimum:
            return None
        return (f"generated tokens agree with FP32's greedy output {agreement:.3f} of the time, under "
                f"--min-token-agreement {self.minimum:g}")

    def describe(self) -> dict[str, float]:
        return {"min_token_agreement": self.minimum}


def with_token_gate(fidelity: Any, model: nn.Module, batches: list[Any], plan: Any) -> Any:
    """``fidelity`` (``accuracy.Fidelity``) with the token gate a generating plan was searched
    under (its ``constraint.min_token_agreement``, else the default); unchanged for other plans."""
    workload = plan.resolved_runtime.run
    if not workload.generates or fidelity.gate is not None:
        return fidelity
    stated = plan.constraint.min_token_agreement if plan.constraint is not None else None
    minimum = DEFAULT_MIN_TOKEN_AGREEMENT if stated is None else stated
    return dataclasses.replace(fidelity, gate=TokenGate(model, batches, workload, minimum))
