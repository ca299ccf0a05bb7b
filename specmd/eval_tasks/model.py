"""The lm_eval model `offload-hf`: lm_eval's Hugging Face model (`HFLM`) running specmd's offloaded MoE.

`lm_eval --model offload-hf --model_args pretrained=PATH,cache_frac=0.05,policy=...,bandwidth_gbps=5`: every
`--model_args` key HFLM does not use itself goes to `AutoOffloadForCausalLM.from_pretrained` (`cache_frac`,
`cache_bytes`, `policy`, `bandwidth_gbps`, `link_latency_s`, `hardware`, `compute_time`, `storage`, ...).
`pretrained=default` is specmd's default model; without a capacity the cache holds `DEFAULT_CACHE_FRAC`.
A key none of them takes (a typo such as `cache_fracc`) is one ValueError listing the keys it accepts, raised
before anything loads, instead of a TypeError from deep inside transformers (`check_model_args`).

`speculate=K` (or `auto`, `auto:K_max`) with `draft_frac=...` (and `draft_precision=...`) decodes the
generation requests speculatively with the model's self-draft (`generate(speculative=...)`, greedy output
unchanged), one request at a time (`batch_size=1`); its counters join the task's cache metrics.

Cache metrics, per task: the counters restart when a task's requests start (the cache keeps what it holds)
and are read when they end. `get_model_info()` hands them to lm_eval, which writes them in the results
JSON under ``config.specmd.tasks.<task>`` beside the scores under ``results.<task>``. Launched as several
processes (`accelerate launch`, `torchrun`), each rank loads its own model and cache on its own device and
rank 0 reports the metrics summed over ranks, each rank's own beside them (`ranks`).

Pad tokens request no experts (DESIGN §5). HFLM's batches carry two kinds:
* generation: the left padding of a batch (HFLM passes its attention mask to `generate`, which the model
  reads), and the rows that have finished while others still generate (HFLM stops a batch only when every
  row has met a stop sequence; transformers keeps running the finished rows). Their positions are masked
  for the rest of the batch, so they cost nothing; their outputs are discarded by lm_eval as before.
* log-likelihood: the right padding of a batch, which HFLM sends without a mask: the model gets one built
  from the unpadded inputs.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lm_eval.models  # noqa: F401  (lm_eval's own models first: a non-empty registry would never load them)
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import stop_sequences_criteria

from specmd import __version__
from specmd.cache.governor import check_speculative
from specmd.eval_tasks import MODEL_NAME, ranks
from specmd.offload_models.auto import AutoOffloadForCausalLM
from specmd.offload_models.base import OffloadMixin
from specmd.offload_models.loading import REFUSED, SUPPORTED

DEFAULT_CACHE_FRAC = 0.05  # the paper's main setting
# A child of lm_eval's logger: the `lm_eval` command shows the per-task cache summary among its own lines.
log = logging.getLogger("lm_eval.specmd")


@register_model(MODEL_NAME)
class OffloadHFLM(HFLM):
    """`HFLM` loading checkpoints with `AutoOffloadForCausalLM`, keeping cache metrics per task."""

    AUTO_MODEL_CLASS = AutoOffloadForCausalLM

    def __init__(
        self,
        pretrained: str = "default",
        cache_frac: float | None = None,
        cache_bytes: int | str | None = None,
        speculate: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        check_model_args(kwargs)
        if speculate is not None:
            check_speculative(speculate)
            if str(kwargs.get("batch_size", 1)) != "1":
                raise ValueError(
                    f"speculate={speculate!r} decodes one request at a time: use batch_size=1 "
                    f"(got batch_size={kwargs['batch_size']!r})"
                )
            if kwargs.get("draft_frac") is None and kwargs.get("draft_bytes") is None:
                raise ValueError(
                    f"speculate={speculate!r} needs the self-draft's budget: add draft_frac=... (e.g. 1.0)"
                )
        self.speculate = speculate
        if pretrained == "default":
            from specmd.default_model import default_model_path

            pretrained = str(default_model_path())
        if cache_frac is None and cache_bytes is None:
            cache_frac = DEFAULT_CACHE_FRAC
        # the checkpoint's own code runs only when asked for (`trust_remote_code=True`); never a prompt
        kwargs["trust_remote_code"] = kwargs.get("trust_remote_code") is True
        if str(kwargs.get("batch_size", 1)).startswith("auto"):
            log.warning("batch_size=auto: the forward passes that size the batch count in the cache metrics")
        ranks.use_cpu_ranks_without_gpus()
        super().__init__(pretrained=pretrained, cache_frac=cache_frac, cache_bytes=cache_bytes, **kwargs)
        self._join_ranks()
        self.task_stats: ranks.TaskStats = {}  # this rank's
        self._every_rank: list[ranks.TaskStats] | None = None  # on rank 0, once gathered: every rank's task_stats
        self._real_inputs: _RealInputs | None = None

    def _join_ranks(self) -> None:
        """Take rank and world size from accelerate whatever the device (HFLM does only with 2+ GPUs)."""
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes

    # ---- requests, one task at a time -----------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        run = super().generate_until
        return self._per_task("generate_until", requests, lambda part: run(part, disable_tqdm))

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        run = super().loglikelihood
        return self._per_task("loglikelihood", requests, lambda part: run(part, disable_tqdm))

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        run = super().loglikelihood_rolling
        return self._per_task("loglikelihood_rolling", requests, lambda part: run(part, disable_tqdm))

    def _per_task(self, request_type: str, requests: list[Any], run: Callable[[list[Any]], list[Any]]) -> list[Any]:
        """Run `requests` task by task, keeping each task's cache metrics; results in the given order."""
        by_task: dict[str | None, list[int]] = {}
        for index, request in enumerate(requests):
            by_task.setdefault(request.task_name, []).append(index)
        results: list[Any] = [None] * len(requests)
        for task, indices in by_task.items():
            self.model.reset_cache_stats()
            outputs = run([requests[i] for i in indices])
            stats = self.model.cache_stats()
            name = str(task)  # a task rarely sends two request types; when it does, keep both
            if self.task_stats.get(name, {}).get("request_type", request_type) != request_type:
                name = f"{task} ({request_type})"
            self.task_stats[name] = {"request_type": request_type, "lm_eval_requests": len(indices), **stats.to_dict()}
            log.info(
                "%sspecmd cache on %s: hit rate %.1f%%, %d collision misses, stall %.3f s, TTFT %.2f ms "
                "(wall %.2f ms), %.1f tokens/s (wall %.1f), %d bytes moved",
                f"rank {self.rank}: " if self.world_size > 1 else "",
                name, 100 * stats.hit_rate, stats.collision_misses, stats.stall_s, 1e3 * stats.ttft_s,
                1e3 * stats.wall_ttft_s, stats.tokens_per_s, stats.wall_tokens_per_s, stats.bytes_transferred,
            )  # fmt: skip
            for index, output in zip(indices, outputs, strict=True):
                results[index] = output
        return results

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """lm_eval's gather of every rank's results to `dst`, carrying each rank's cache metrics along.

        lm_eval calls it on every rank once all requests have run, rank 0 writing the results after, so
        the metrics travel in the same collective as the scores: no extra one to fall out of step.
        """
        gathered = super().gather_object((obj, self.task_stats), dst)
        if gathered is None:
            return None
        self._every_rank = [stats for _, stats in gathered]
        return [item for item, _ in gathered]

    def get_model_info(self) -> dict[str, Any]:
        """HFLM's model info plus `specmd`: the cache options, the model's expert layout, metrics per task
        (on several ranks: summed over them, each rank's own under `per_rank`)."""
        info = super().get_model_info()
        info["specmd"] = {
            "version": __version__,
            "options": self.model.offload_options.to_dict(),
            "model": self.model.trace_meta(),
            "tasks": self.task_stats,
        }
        if self.world_size > 1:
            if self._every_rank is None:
                raise RuntimeError("the other ranks' cache metrics never arrived: lm_eval gathered no results")
            info["specmd"]["world_size"] = self.world_size
            info["specmd"]["tasks"] = ranks.aggregate(self._every_rank)
        return info

    # ---- pad tokens request nothing -------------------------------------------------------------
    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any):
        if self.speculate is not None:  # one request (batch_size=1): no row to mask
            return super()._model_generate(context, max_length, stop, speculative=self.speculate, **generation_kwargs)
        rows = _FinishedRows(
            stop_sequences_criteria(self.tokenizer, stop, context.shape[1], context.shape[0]),
            self.model.generation_config.eos_token_id,
        )
        with self._rewrite_forward(rows):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, override_bs: int | None = None):
        if self.backend == "causal":
            self._real_inputs = _RealInputs(requests, self.max_length)
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._real_inputs = None

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        mask = None
        if self._real_inputs is not None and attn_mask is None and labels is None:
            mask = self._real_inputs.mask(inps)
        if mask is None:
            return super()._model_call(inps, attn_mask, labels)
        with self._rewrite_forward(lambda kwargs: {**kwargs, "attention_mask": mask}):
            return super()._model_call(inps, attn_mask, labels)

    @contextmanager
    def _rewrite_forward(self, rewrite: Callable[[dict[str, Any]], dict[str, Any] | None]) -> Iterator[None]:
        """While inside, each model forward's keyword arguments pass through `rewrite` (None: unchanged)."""

        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            changed = rewrite(kwargs)
            return None if changed is None else (args, changed)

        handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def accepted_model_args() -> dict[str, list[str]]:
    """The `--model_args` keys `offload-hf` takes, by who reads them: specmd's `from_pretrained`, lm_eval's
    `HFLM`, and the transformers `from_pretrained` keywords specmd runs (`loading.SUPPORTED`)."""

    def named(function: Callable[..., Any], kinds: tuple[Any, ...]) -> list[str]:
        return [n for n, p in inspect.signature(function).parameters.items() if p.kind in kinds and n != "self"]

    specmd = [*named(OffloadMixin.from_pretrained, (inspect.Parameter.KEYWORD_ONLY,)), "speculate"]
    hflm = named(HFLM.__init__, (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))
    transformers = [key for key in SUPPORTED if key not in hflm]
    return {"specmd's": specmd, "lm_eval HFLM's": hflm, "transformers from_pretrained's": transformers}


def check_model_args(kwargs: dict[str, Any]) -> None:
    """Refuse, with one ValueError listing the accepted keys, every key of `kwargs` no reader takes.

    A transformers keyword specmd refuses (`loading.REFUSED`) passes, to be refused with its own reason.
    """
    accepted = accepted_model_args()
    known = {key for keys in accepted.values() for key in keys} | set(REFUSED)
    unknown = [key for key in kwargs if key not in known]
    if not unknown:
        return
    guesses = [match for key in unknown for match in difflib.get_close_matches(key, known, n=1)]
    hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
    listing = "; ".join(f"{reader} {', '.join(sorted(keys))}" for reader, keys in accepted.items())
    raise ValueError(
        f"{MODEL_NAME} takes no model_args key {', '.join(map(repr, unknown))}{hint}; it accepts {listing}"
    )


class _FinishedRows:
    """Masks, in each decode step of one batched `generate`, the rows that no longer need computing.

    A row is finished once one of HFLM's stop sequences has appeared in its continuation (the same
    criteria HFLM hands `generate`, evaluated here on the same tokens) or it produced an end-of-sequence
    token. transformers keeps feeding such rows until the whole batch stops; masking the position each
    step feeds them (attention mask 0) makes the cache treat it as padding. Rows still generating are
    untouched, so lm_eval's outputs are unchanged.
    """

    def __init__(self, criteria: Sequence[Any], eos_token_id: int | list[int] | None) -> None:
        self.criteria = list(criteria)
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
        self.eos = torch.tensor(eos, dtype=torch.long)
        self.tokens: torch.Tensor | None = None  # [B, tokens so far]
        self.finished: torch.Tensor | None = None  # [B] bool
        self.off = False

    def __call__(self, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        new = kwargs.get("input_ids")  # [B, S]: the prompt first, then one token per step
        mask = kwargs.get("attention_mask")  # [B, past + S]
        if new is None or mask is None or self.off:
            return None
        if self.tokens is None:
            # Beam search or several samples per prompt widen the batch beyond HFLM's criteria: leave it be.
            self.off = any(len(c.done_tracker) != new.shape[0] for c in self.criteria)
            self.tokens = new
            self.finished = torch.zeros(new.shape[0], dtype=torch.bool)
            return None
        self.tokens = torch.cat([self.tokens, new.to(self.tokens.device)], dim=1)
        for criterion in self.criteria:
            criterion(self.tokens, None)  # updates its per-row done_tracker, as generate's own copy does
        stopped = torch.tensor([any(c.done_tracker[row] for c in self.criteria) for row in range(new.shape[0])])
        ended = torch.isin(self.tokens[:, -1].cpu(), self.eos)
        self.finished |= stopped | ended
        if not self.finished.any():
            return None
        mask = mask.clone()
        mask[self.finished.to(mask.device), -new.shape[1] :] = 0
        return {**kwargs, "attention_mask": mask}


class _RealInputs:
    """The unpadded inputs HFLM builds for a list of log-likelihood requests, to find them in its batches.

    HFLM right-pads each batch with token 0 and calls the model without a mask; `mask` rebuilds it by
    matching each row with the longest request input it starts with (only zeros follow). A row no input
    explains stays unmasked.
    """

    def __init__(self, requests: Sequence[tuple[Any, list[int], list[int]]], max_length: int) -> None:
        self.by_length: dict[int, set[tuple[int, ...]]] = {}
        for _, context, continuation in requests:
            tokens = tuple((context + continuation)[-(max_length + 1) :][:-1])  # what HFLM feeds the model
            self.by_length.setdefault(len(tokens), set()).add(tokens)

    def mask(self, batch: torch.Tensor) -> torch.Tensor | None:
        """[B, L] attention mask of a right-padded batch; None when no row is padded."""
        if batch.dim() != 2 or batch.shape[0] < 2:
            return None
        width = batch.shape[1]
        lengths = []
        for row in batch.tolist():
            content = width
            while content and row[content - 1] == 0:
                content -= 1
            fits = sorted((n for n in self.by_length if content <= n <= width), reverse=True)
            lengths.append(next((n for n in fits if tuple(row[:n]) in self.by_length[n]), width))
        if all(n == width for n in lengths):
            return None
        positions = torch.arange(width, device=batch.device)
        return (positions[None, :] < torch.tensor(lengths, device=batch.device)[:, None]).long()
