"""Speculative decoding with the model's self-draft: `model.generate(**inputs, speculative=K or "auto")`.

Each step, the draft (the model's dense part with its experts at a low precision, `draft.SelfDraft`) proposes up
to K tokens, one pass each, writing into the model's own KV cache; those entries are cut off again and the model
verifies the pending token and the K drafts in ONE forward pass through its ordinary cache. Greedy decoding keeps
the drafts up to the first that differs from the model's argmax and adds the model's own next token, so the
output is exactly plain greedy decoding's; sampling accepts a draft d with probability min(1, p(d) / q(d)) and
otherwise resamples from max(0, p - q) normalized (Leviathan et al., 2023), so each token is distributed as the
model's own sampling would distribute it. K=0 is plain decoding, pass for pass.

Shapes: V = vocabulary, K = drafted tokens this step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from specmd.cache.governor import Counters, Governor, VerifyOutcome, check_speculative, make_governor

SUPPORTED = (
    "input_ids", "attention_mask", "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p",
    "eos_token_id", "pad_token_id", "streamer", "generation_config", "use_cache", "stopping_criteria",
)  # fmt: skip
GENERATION_KEYS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
                   "pad_token_id")  # fmt: skip
"""generate's keywords that go into the generation config."""


@dataclass(frozen=True)
class Settings:
    """generate's keywords checked for speculative decoding: the prompt ([1, prompt length]), the generation config,
    the new tokens wanted, the end-of-text tokens and the stopping criteria (transformers' or lm_eval's)."""

    input_ids: torch.Tensor
    config: Any
    new: int
    stops: set[int]
    criteria: Sequence[Any]

    def stopped(self, tokens: Sequence[int]) -> bool:
        """Whether a stopping criterion ends the text once the new `tokens` follow the prompt (each criterion is
        asked after every token, in order, as generate asks it)."""
        if not self.criteria:
            return False
        ids = torch.cat([self.input_ids, torch.tensor([list(tokens)], device=self.input_ids.device)], dim=1)
        return any(bool(torch.as_tensor(criterion(ids, None)).any()) for criterion in self.criteria)


@dataclass(frozen=True)
class Picker:
    """How the next token is picked from logits: greedy, or sampled after the generation config's warpers."""

    sample: bool
    warp: LogitsProcessorList

    @classmethod
    def from_config(cls, config: Any) -> Picker:
        warp = LogitsProcessorList()
        if config.do_sample:
            if config.temperature is not None and config.temperature != 1.0:
                warp.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k:
                warp.append(TopKLogitsWarper(config.top_k))
            if config.top_p is not None and config.top_p < 1.0:
                warp.append(TopPLogitsWarper(config.top_p))
        return cls(bool(config.do_sample), warp)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[n, V] logits -> [n, V] float32 probabilities after the warpers."""
        scores = self.warp(None, logits.float())  # the warpers used here do not read input_ids
        return torch.softmax(scores, dim=-1)

    def pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """The token from [V] logits, and (sampling) the [V] distribution it was drawn from."""
        if not self.sample:
            return int(torch.argmax(logits)), None
        probs = self.probs(logits[None])[0]  # [V]
        return int(torch.multinomial(probs, 1)), probs


def accept_greedy(logits: torch.Tensor, drafts: Sequence[int]) -> tuple[int, int]:
    """Verify greedy drafts against the model's [K+1, V] logits: (drafts kept, the model's next token)."""
    best = torch.argmax(logits, dim=-1).tolist()  # [K+1]
    kept = 0
    while kept < len(drafts) and drafts[kept] == best[kept]:
        kept += 1
    return kept, best[kept]


def accept_sampled(p: torch.Tensor, q: torch.Tensor, drafts: Sequence[int]) -> tuple[int, int]:
    """The speculative-sampling rule on the model's [K+1, V] and the draft's [K, V] distributions: (drafts kept,
    the next token). Draft j stays with probability min(1, p_j(d) / q_j(d)); the first one rejected is replaced
    by a sample of max(0, p_j - q_j) normalized; when all stay, the next token is a sample of p_K."""
    for j, token in enumerate(drafts):
        ratio = float(p[j, token]) / float(q[j, token])
        if ratio >= 1.0 or float(torch.rand(())) < ratio:
            continue
        residual = torch.clamp(p[j] - q[j], min=0.0)  # [V]
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: rejection had no mass to leave
            residual = p[j]
        return j, int(torch.multinomial(residual, 1))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1))


def _settings(model: Any, kwargs: dict[str, Any]) -> Settings:
    """generate's keywords checked for speculative decoding."""
    unknown = sorted(set(kwargs) - set(SUPPORTED))
    if unknown:
        raise ValueError(f"speculative decoding does not take {', '.join(unknown)}; it takes {', '.join(SUPPORTED)}")
    input_ids = kwargs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("speculative decoding needs input_ids, a [1, prompt length] tensor of token ids")
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding runs one sequence at a time; got a batch of {input_ids.shape[0]}")
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("speculative decoding runs unpadded prompts; the attention mask has padding")
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if k in GENERATION_KEYS and v is not None})
    new = config.max_new_tokens
    if new is None:
        new = config.max_length - input_ids.shape[1]
    if not (isinstance(new, int) and new >= 1):
        raise ValueError(f"max_new_tokens must be a whole number >= 1, got {new!r}")
    eos = config.eos_token_id
    stops = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    return Settings(input_ids, config, new, stops, list(kwargs.get("stopping_criteria") or ()))


def speculative_generate(model: Any, speculative: int | str, **kwargs: Any) -> torch.Tensor:
    """`model.generate(..., speculative=...)`: the prompt and its continuation, [1, prompt + new] token ids."""
    settings = _settings(model, kwargs)
    runtime = model._runtime()
    check_speculative(speculative)
    governor = runtime.governors.get(speculative)  # what a governor learned carries over to the next text
    if governor is None:
        governor = runtime.governors[speculative] = make_governor(speculative, runtime.manager, runtime.draft)
    streamer = kwargs.get("streamer")
    with model._forward_lock, torch.no_grad():
        tokens = _decode(model, runtime, settings, Picker.from_config(settings.config), governor, streamer)
    return _output(settings.input_ids, tokens)


def record_lookahead(model: Any, recorder: Any, lookahead: int, **kwargs: Any) -> torch.Tensor:
    """Greedy decoding that shows `recorder` (a `specmd.sim.record.TraceRecorder` observing the model), at every
    decode position, the self-draft's chain of up to `lookahead` drafts and the verify pass over them: a lookahead
    trace, from which a replay runs speculative decoding with any K <= `lookahead` or the governor. Each position's
    chain is drafted and verified and then dropped from the KV cache, and the position decodes plainly: the output,
    the KV cache and the position's own routing are plain greedy decoding's, pass for pass."""
    if not (isinstance(lookahead, int) and not isinstance(lookahead, bool) and lookahead >= 1):
        raise ValueError(f"lookahead must be a whole number of drafted tokens >= 1, got {lookahead!r}")
    settings = _settings(model, kwargs)
    input_ids, new, stops = settings.input_ids, settings.new, settings.stops
    if settings.config.do_sample:
        raise ValueError("a lookahead trace records greedy decoding; pass do_sample=False")
    if settings.criteria:
        raise ValueError("a lookahead trace records decoding that ends at max_new_tokens or an end-of-text token")
    runtime = model._runtime()
    if runtime.draft is None:
        raise ValueError(
            "a lookahead trace records the self-draft's predictions: load the model with draft_frac=... or "
            "draft_bytes=... (and draft_precision=..., default int4)"
        )
    greedy = Picker(False, LogitsProcessorList())
    with model._forward_lock, torch.no_grad():
        cache = DynamicCache(config=model.config)
        forward = _forwarder(model, cache, input_ids.device)
        pending = int(torch.argmax(forward(input_ids)[-1]))
        tokens = [pending]
        while len(tokens) < new and pending not in stops:
            position = cache.get_seq_length()
            k = min(lookahead, new - len(tokens) - 1)
            recorder.begin_chain(position)
            kept = 0
            if k:
                drafts, _ = _draft(runtime, forward, greedy, pending, k)
                cache.crop(-k)
                logits = forward([pending, *drafts])  # [K+1, V]: the verify pass
                kept, _ = accept_greedy(logits, drafts)
                cache.crop(-(k + 1))
            recorder.end_chain(kept)
            pending = int(torch.argmax(forward([pending])[-1]))  # the plain pass: the position's own routing
            tokens.append(pending)
    return _output(input_ids, tokens)


def _output(input_ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """The prompt and the new tokens, [1, prompt + new]."""
    return torch.cat([input_ids, torch.tensor([tokens], dtype=input_ids.dtype, device=input_ids.device)], dim=1)


def _forwarder(model: Any, cache: DynamicCache, device: torch.device) -> Callable[[Any], torch.Tensor]:
    """One forward pass of the model over new tokens (a [1, S] tensor or a list of ids) on `cache`: [S, V] logits."""

    def forward(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        batch = ids if isinstance(ids, torch.Tensor) else torch.tensor([list(ids)], device=device)  # [1, S]
        past = cache.get_seq_length()
        mask = torch.ones(1, past + batch.shape[1], dtype=torch.long, device=device)
        out = model(input_ids=batch, attention_mask=mask, past_key_values=cache, use_cache=True)
        return out.logits[0]  # [S, V]

    return forward


def _decode(
    model: Any, runtime: Any, settings: Settings, picker: Picker, governor: Governor, streamer: Any
) -> list[int]:
    """The decode loop; returns the new tokens."""
    input_ids, max_new, stops = settings.input_ids, settings.new, settings.stops
    cache = DynamicCache(config=model.config)
    forward = _forwarder(model, cache, input_ids.device)

    def emit(new: list[int]) -> None:
        if streamer is not None:
            streamer.put(torch.tensor(new))

    if streamer is not None:
        streamer.put(input_ids.cpu())
    pending, _ = picker.pick(forward(input_ids)[-1])
    tokens = [pending]
    emit(tokens)
    done = settings.stopped(tokens)
    while len(tokens) < max_new and pending not in stops and not done:
        base = cache.get_seq_length()
        k = governor.choose(max_new - len(tokens) - 1, base)
        before = Counters.of(runtime.manager)
        drafts, q = _draft(runtime, forward, picker, pending, k)
        if drafts:
            cache.crop(-k)
        manager = runtime.manager
        logits = forward([pending, *drafts])  # [K+1, V]: the verify pass
        if not picker.sample:
            kept, following = accept_greedy(logits, drafts)
        elif drafts:
            kept, following = accept_sampled(picker.probs(logits), torch.stack(q), drafts)
        else:
            kept, (following, _) = 0, picker.pick(logits[0])
        cache.crop(-(k - kept))
        new = [*drafts[:kept], following]
        for i, token in enumerate(new):  # an accepted stop token ends the text there
            if token in stops:
                new = new[: i + 1]
                break
        new = new[: max_new - len(tokens)]
        for i in range(len(new)):  # a stopping criterion met ends the text at that token
            if settings.stopped([*tokens, *new[: i + 1]]):
                new, done = new[: i + 1], True
                break
        manager.stats.record_verify(k, len(new) - 1)
        governor.update(VerifyOutcome(k, kept, before, Counters.of(manager)))
        tokens.extend(new)
        emit(new)
        pending = new[-1]
        if base + 1 + kept != cache.get_seq_length():  # an internal invariant of the crops above
            raise AssertionError("speculative decoding's KV cache lost count")
    if streamer is not None:
        streamer.end()
    return tokens


def _draft(
    runtime: Any, forward: Callable[[Sequence[int]], torch.Tensor], picker: Picker, pending: int, k: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Up to `k` draft tokens after `pending` (one draft pass each) and, when sampling, their [V] distributions."""
    drafts: list[int] = []
    q: list[torch.Tensor] = []
    if not k:
        return drafts, q
    with runtime.drafting():
        token = pending
        for _ in range(k):
            token, probs = picker.pick(forward([token])[-1])
            drafts.append(token)
            if probs is not None:
                q.append(probs)
    return drafts, q
