"""The mixin every offloaded architecture shares: expert swap, loading, the pass scope, stats and close.

An architecture file declares an `MoEArch` and mixes `OffloadMixin` into the transformers class.
"""

from __future__ import annotations

import inspect
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from transformers import PretrainedConfig

from specmd import __version__
from specmd.cache.clock import ModelShape
from specmd.cache.draft import SelfDraft
from specmd.cache.engine import ExpertCache
from specmd.cache.factory import build_manager
from specmd.cache.layout import ExpertLayout
from specmd.cache.live.arena import SlotArena
from specmd.cache.live.copiers import copier_for
from specmd.cache.live.host import HostTier, check_host_memory
from specmd.cache.live.payload import LivePayload
from specmd.cache.live.store import open_store
from specmd.cache.live.watchdog import Watchdog
from specmd.cache.manager import CacheManager
from specmd.cache.stats import CacheStats
from specmd.offload_models.checkpoint import (
    HUB_KEYWORDS,
    CheckpointError,
    ExpertCheckpoint,
    ExpertKeyPatterns,
    checkpoint_files,
    read_config,
)
from specmd.offload_models.experts import OffloadedExperts
from specmd.offload_models.loading import check_loading_keywords
from specmd.offload_models.observer import RoutingObserver
from specmd.offload_models.options import OffloadOptions
from specmd.offload_models.predictors import DEFAULT_PREDICTOR, make_predictor
from specmd.offload_models.routing import SoftmaxTopK
from specmd.offload_models.runtime import OffloadRuntime, shutdown
from specmd.quant.formats import ExpertShape, get_format, precision_of_dtype
from specmd.quant.persist import QuantizedCopies


def _all_layers(config: PretrainedConfig) -> list[int]:
    return list(range(config.num_hidden_layers))


@dataclass(frozen=True)
class MoEArch:
    """What an architecture file declares; the mixin does the rest.

    Attributes:
        model_type: the `config.model_type` this class loads.
        checkpoint: where the checkpoint keeps routed-expert weights.
        router_attr: the sparse block's router attribute (the block is `model.layers[i].mlp`).
        num_experts_attr, top_k_attr, intermediate_attr: config fields for experts per layer,
            experts per token, and an expert's intermediate size.
        fixed_top_k: experts per token when the router picks a set number whatever the config says.
        moe_layers: the decoder layers that have a sparse block, from the config.
        router_contract: how the native router turns logits into weights and choices, so routing
            policies can re-select with biased logits; None where it cannot be reproduced (sparsemixer).
    """

    model_type: str
    checkpoint: ExpertKeyPatterns
    router_attr: str = "gate"
    num_experts_attr: str = "num_experts"
    top_k_attr: str = "num_experts_per_tok"
    intermediate_attr: str = "intermediate_size"
    fixed_top_k: int | None = None
    moe_layers: Callable[[PretrainedConfig], list[int]] = field(default=_all_layers)
    router_contract: SoftmaxTopK | None = field(default_factory=SoftmaxTopK)

    def check(self, config: PretrainedConfig) -> None:
        """A config whose layer, expert or size counts are not whole numbers >= 1 is a ValueError naming the field."""
        counts = ["num_hidden_layers", "hidden_size", self.num_experts_attr, self.intermediate_attr]
        if self.fixed_top_k is None:
            counts.append(self.top_k_attr)
        for name in counts:
            value = getattr(config, name, None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"the config's {name} must be a whole number >= 1, got {value!r}")

    def num_experts(self, config: PretrainedConfig) -> int:
        """Routed experts per MoE layer."""
        return getattr(config, self.num_experts_attr)

    def top_k(self, config: PretrainedConfig) -> int:
        """Experts the router picks per token."""
        return self.fixed_top_k if self.fixed_top_k is not None else getattr(config, self.top_k_attr)

    def expert_shape(self, config: PretrainedConfig) -> ExpertShape:
        """The shape of one routed expert."""
        return ExpertShape(config.hidden_size, getattr(config, self.intermediate_attr))

    def layout(
        self,
        config: PretrainedConfig,
        precisions: tuple[str, ...],
        full_precision: str,
        shape: ModelShape | None = None,
    ) -> ExpertLayout:
        """The expert layout of a model of `config` storing its experts at `precisions` (requests use the first),
        a cache fraction counting them at `full_precision`; `shape` prices its compute."""
        expert = self.expert_shape(config)
        return ExpertLayout(
            num_layers=config.num_hidden_layers,
            moe_layers=tuple(self.moe_layers(config)),
            experts_per_layer=self.num_experts(config),
            top_k=self.top_k(config),
            precision=precisions[0],
            expert_bytes={name: get_format(name).nbytes(expert) for name in precisions},
            full_precision=full_precision,
            full_expert_bytes=get_format(full_precision).nbytes(expert),
            shape=shape,
        )


class OffloadMixin:
    """Turns a transformers MoE causal LM into one whose routed experts live behind specmd's cache.

    Expert weights are never parameters or buffers of the model: `to()`, `state_dict()` and
    `named_parameters()` see only the dense part.
    """

    arch: ClassVar[MoEArch]
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"\.experts\."]  # experts load through specmd
    _can_compile_fullgraph: ClassVar[bool] = False  # the cache is Python control flow per layer

    def __init__(self, config: PretrainedConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._specmd: OffloadRuntime | None = None
        self.offload_options: OffloadOptions | None = None
        self._forward_lock = threading.RLock()  # one forward pass at a time: concurrent generate calls take turns
        num_experts = self.arch.num_experts(config)
        moe_layers = self.arch.moe_layers(config)
        assert moe_layers == [i for i, layer in enumerate(self.model.layers) if hasattr(layer.mlp, "experts")], (
            f"{self.arch.model_type}: the declared MoE layers differ from the model's sparse blocks"
        )
        for index in moe_layers:
            mlp = self.model.layers[index].mlp
            mlp.experts = OffloadedExperts(index, num_experts, mlp.experts.act_fn)

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *model_args: Any,
        cache_frac: float | None = None,
        cache_bytes: int | str | None = None,
        policy: Any = None,
        bandwidth_gbps: float | None = None,
        link_latency_s: float | None = None,
        hardware: str | None = None,
        compute_time: str = "profile",
        expert_precisions: tuple[str, ...] | None = None,
        storage: str = "ram",
        host_cache_frac: float | None = None,
        host_cache_bytes: int | str | None = None,
        host_eviction: Any = "lru",
        disk: str | None = None,
        predictor: str | None = None,
        shape_from: str | None = None,
        transfer_timeout_s: float = OffloadOptions.transfer_timeout_s,
        progress: bool = True,
        draft_frac: float | None = None,
        draft_bytes: int | str | None = None,
        draft_precision: str = OffloadOptions.draft_precision,
        **kwargs: Any,
    ) -> Any:
        """Load a checkpoint with its experts in a cache of `cache_frac` (or `cache_bytes`: a count, or a size such
        as "600MB" or "2GiB").

        With `storage="disk"`, `host_cache_frac` (or `host_cache_bytes`) adds a host-RAM tier between the disk and
        the cache, evicting by `host_eviction` (LRU by default), and `disk` names the drive the emulation prices
        reads on (`specmd.cache.hardware.DISKS`, or "profile"; None: reads take no emulated time).

        Every other keyword goes to transformers' `from_pretrained` (`dtype`, `device_map`, `revision`, ...),
        except those specmd does not run, which are refused (`loading.check_loading_keywords`): the
        non-expert weights load whole onto one device. No code of the checkpoint's own runs unless
        `trust_remote_code=True` is passed (None counts as False: no prompt).
        `draft_frac` / `draft_bytes` give the model a self-draft for `generate(speculative=...)`: its experts at
        `draft_precision` in a cache of that budget (see `specmd.offload_models.speculative`).
        All settings are checked before anything loads; an error leaves nothing loaded and no thread.

        Example::

            model = OffloadOLMoE.from_pretrained(path, cache_frac=0.05, policy="topk/least-stale/fetch/standard",
                                                 bandwidth_gbps=5.0)
            out = model.generate(**inputs, max_new_tokens=32)
            print(model.cache_stats().hit_rate)
        """
        options = OffloadOptions(
            cache_frac=cache_frac,
            cache_bytes=cache_bytes,
            policy=policy,
            bandwidth_gbps=bandwidth_gbps,
            link_latency_s=link_latency_s,
            hardware=hardware or OffloadOptions.hardware,
            compute_time=compute_time,
            expert_precisions=expert_precisions,
            storage=storage,
            host_cache_frac=host_cache_frac,
            host_cache_bytes=host_cache_bytes,
            host_eviction=host_eviction,
            disk=disk,
            predictor=predictor,
            shape_from=shape_from,
            transfer_timeout_s=transfer_timeout_s,
            progress=progress,
            draft_frac=draft_frac,
            draft_bytes=draft_bytes,
            draft_precision=draft_precision,
        )
        check_loading_keywords(kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        kwargs["trust_remote_code"] = kwargs.get("trust_remote_code") is True
        hub = {k: kwargs[k] for k in HUB_KEYWORDS if kwargs.get(k) is not None}
        config = kwargs.pop("config", None)
        if not isinstance(config, PretrainedConfig):
            config = read_config(pretrained_model_name_or_path, trust_remote_code=kwargs["trust_remote_code"], **hub)
        cls._check_config(config)
        price_as = None
        if options.shape_from is not None:
            from specmd.offload_models.info import expert_layout, load_config  # info imports every architecture

            price_as = expert_layout(load_config(options.shape_from))
        experts = ExpertCheckpoint(
            checkpoint_files(pretrained_model_name_or_path, variant=kwargs.get("variant"), **hub),
            cls.arch.checkpoint,
            cls.arch.moe_layers(config),
            cls.arch.num_experts(config),
            cls.arch.expert_shape(config),
        )
        model, info = super().from_pretrained(  # type: ignore[misc]
            pretrained_model_name_or_path, *model_args, config=config, output_loading_info=True, **kwargs
        )
        try:
            if info["missing_keys"]:
                missing = sorted(info["missing_keys"])
                raise CheckpointError(
                    f"the checkpoint lacks {len(missing)} weight(s) the model needs, e.g. {missing[0]}"
                )
            model._attach_cache(options, experts, price_as)
        except BaseException:
            model.close()
            raise
        return (model, info) if want_info else model

    @classmethod
    def _check_config(cls, config: PretrainedConfig) -> None:
        model_type = getattr(config, "model_type", None)
        if model_type != cls.arch.model_type:
            raise ValueError(
                f"{cls.__name__} loads '{cls.arch.model_type}' checkpoints; this one is {model_type!r}. "
                "Use AutoOffloadForCausalLM to pick the class from the checkpoint."
            )
        cls.arch.check(config)
        quantized = getattr(config, "quantization_config", None)
        if quantized is not None:
            method = quantized.get("quant_method") if isinstance(quantized, dict) else type(quantized).__name__
            raise ValueError(
                f"this checkpoint is quantized ({method}); specmd loads unquantized checkpoints and quantizes "
                "the experts itself: pass expert_precisions, e.g. ('int8',) or ('nf4',), with the original checkpoint"
            )
        if not cls.arch.moe_layers(config):
            raise ValueError(f"this {model_type} checkpoint has no MoE layers: there are no experts to offload")

    def _attach_cache(
        self, options: OffloadOptions, experts: ExpertCheckpoint, price_as: ExpertLayout | None = None
    ) -> None:
        config, arch = self.config, self.arch
        devices = {p.device for p in self.parameters()}
        if len(devices) != 1 or "meta" in {d.type for d in devices}:  # device_map was checked; this is a guard
            raise ValueError(
                f"specmd needs the non-expert weights on one device, got {sorted(map(str, devices))}; "
                "pass device_map={'': device}"
            )
        device = devices.pop()
        if options.storage == "disk" and device.type == "cpu":
            # transformers leaves CPU weights mmapped from the checkpoint: a file truncated under the running model
            # would kill it (SIGBUS) where the disk tier reports an error. Own copies of the dense part avoid that.
            for tensor in (*self.parameters(), *self.buffers()):
                tensor.data = tensor.data.clone()
        native = precision_of_dtype(self.dtype)
        precisions = options.expert_precisions or (native,)
        shape = arch.expert_shape(config)
        # cache_frac is a fraction of every routed expert at full precision (the model's dtype), whatever
        # precisions are stored: the fast memory it stands for does not grow when experts shrink.
        layout = arch.layout(config, precisions, native, self._model_shape(shape))
        real_bytes = layout.expert_bytes
        if price_as is not None:  # the emulation prices experts and compute as that model's
            layout = layout.priced_like(price_as)

        def rebuild() -> CacheManager:  # a fresh cache and policies: at load, and after a pass that raised
            return build_manager(layout, options, measured_compute=options.compute_time == "measured")

        manager = rebuild()
        if not manager.policies.routing.neutral and arch.router_contract is None:
            raise ValueError(
                f"routing policy {options.policy.routing.name!r} re-selects experts, which {type(self).__name__}'s "
                "router cannot do (its choice is not a softmax top-k); use 'standard' routing"
            )

        def real(capacity: int) -> int:  # an arena holds as many experts as the (possibly priced) capacity admits
            return max(-(-capacity * real_bytes[p] // layout.expert_bytes[p]) for p in precisions)

        host_bytes = None
        if manager.path is not None and manager.path.host is not None:
            host_bytes = real(manager.path.host.capacity_bytes)
            check_host_memory(host_bytes)
        formats = {name: get_format(name) for name in precisions}
        draft_format = get_format(options.draft_precision) if options.has_draft else None
        stored = dict(formats)
        if draft_format is not None:
            stored.setdefault(draft_format.name, draft_format)
        copies = None
        if any(fmt.persist for fmt in stored.values()):
            copies = QuantizedCopies(
                experts.files, model_type=config.model_type, layers=layout.moe_layers,
                num_experts=layout.experts_per_layer, shape=shape,
            )  # fmt: skip
        store = open_store(
            options.storage, experts, list(stored.values()), shape,
            pin=device.type == "cuda", progress=options.progress, copies=copies,
        )  # fmt: skip
        watchdog = None
        try:
            arena = SlotArena(real(manager.cache.capacity_bytes), real_bytes.values(), device)
            watchdog = Watchdog(threads=getattr(store, "readers", 1))  # queue depth where the tier needs it
            host = None
            if host_bytes is not None:
                host_arena = SlotArena(host_bytes, real_bytes.values(), "cpu", pin=device.type == "cuda")
                host = HostTier(store, host_arena, watchdog, options.transfer_timeout_s)
            payload = LivePayload(
                host or store, arena, watchdog, copier_for(device), formats, shape, timeout_s=options.transfer_timeout_s
            )
            manager.attach(payload, host)
            routers = {layer: getattr(self.model.layers[layer].mlp, arch.router_attr) for layer in layout.moe_layers}
            meta = {
                "model": config.name_or_path or None,
                "model_type": config.model_type,
                **layout.to_header(),
                "priced_as": options.shape_from,
                "predictor": options.predictor or DEFAULT_PREDICTOR,
                "specmd_version": __version__,
            }
            predictor = make_predictor(meta["predictor"], routers)
            draft = None
            if draft_format is not None:
                draft = self._make_draft(options, price_as, store, watchdog, device)
                drafted = draft.manager.layout
                meta["draft"] = {
                    "precision": drafted.precision,
                    "expert_bytes": drafted.expert_bytes[drafted.precision],
                }
            runtime = OffloadRuntime(manager, watchdog, routers, meta, predictor, rebuild, draft)
            if not manager.policies.routing.neutral:
                runtime.steer_routing(arch.router_contract, config, layout.top_k)  # type: ignore[arg-type]
        except BaseException:
            if watchdog is None:
                store.close()
            else:
                shutdown(watchdog, store)
            raise
        for layer in layout.moe_layers:
            self.model.layers[layer].mlp.experts.runtime = runtime
        self._specmd = runtime
        self.offload_options = options
        self.generation_config.disable_compile = True  # the per-layer cache logic is not compilable
        weakref.finalize(self, shutdown, watchdog, store)

    def _make_draft(
        self, options: OffloadOptions, price_as: ExpertLayout | None, store: Any, watchdog: Watchdog, device: Any
    ) -> SelfDraft:
        """The self-draft: a cache of the draft's budget over the same store, with its own arena."""
        config, arch = self.config, self.arch
        shape = arch.expert_shape(config)
        precision = options.draft_precision
        layout = arch.layout(config, (precision,), precision_of_dtype(self.dtype), self._model_shape(shape))
        real_bytes = layout.expert_bytes[precision]
        if price_as is not None:
            layout = layout.priced_like(price_as)
        capacity = options.draft_capacity_bytes(layout)
        draft_options = replace(options, cache_frac=None, cache_bytes=capacity, draft_frac=None, draft_bytes=None)

        def rebuild() -> CacheManager:
            return build_manager(layout, draft_options, measured_compute=options.compute_time == "measured")

        arena = SlotArena(-(-capacity * real_bytes // layout.expert_bytes[precision]), [real_bytes], device)
        fmt = get_format(precision)
        payload = LivePayload(
            store, arena, watchdog, copier_for(device), {precision: fmt}, shape, timeout_s=options.transfer_timeout_s
        )
        return SelfDraft(rebuild, payload, layout.moe_layers)

    def _model_shape(self, expert: ExpertShape) -> ModelShape:
        config = self.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return ModelShape(
            num_layers=len(self.model.layers),
            hidden_size=config.hidden_size,
            kv_dim=kv_heads * head_dim,
            dense_params=tuple(sum(p.numel() for p in layer.parameters()) for layer in self.model.layers),
            head_params=sum(p.numel() for p in (*self.lm_head.parameters(), *self.model.norm.parameters())),
            expert_params=expert.params,
            dtype_bytes=self.dtype.itemsize,
        )

    # ---- running -------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        runtime = self._runtime()
        names = _forward_parameters(type(self))
        given = dict(zip(names, args, strict=False)) | kwargs
        tokens = given.get("input_ids")
        if tokens is None:
            tokens = given.get("inputs_embeds")
        if tokens is None:
            return super().forward(*args, **kwargs)  # type: ignore[misc]  (transformers reports the error)
        cache = given.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        with (
            self._forward_lock,
            runtime.forward_pass(tokens.shape[0], tokens.shape[1], given.get("attention_mask"), past),
        ):
            return super().forward(*args, **kwargs)  # type: ignore[misc]

    def generate(self, *args: Any, speculative: int | str | None = None, **kwargs: Any) -> Any:
        """transformers' `generate`; with `speculative` set, speculative decoding with the self-draft.

        `speculative=K` drafts K tokens per verify pass (0 is plain decoding), `"auto"` (or `"auto:K_max"`) lets
        the governor choose K in 0..K_max each step (`specmd.cache.governor`). It runs one unpadded sequence,
        greedy or sampled (temperature, top_k, top_p), and returns the token ids as `generate` does; greedy output
        is plain greedy decoding's. See `specmd.offload_models.speculative`.
        """
        if speculative is None:
            return super().generate(*args, **kwargs)  # type: ignore[misc]
        from specmd.offload_models.speculative import speculative_generate

        if args:
            kwargs["input_ids"] = args[0]
            if len(args) > 1:
                raise ValueError("speculative decoding takes its settings as keywords, not positional arguments")
        return speculative_generate(self, speculative, **kwargs)

    def generate_lookahead(self, recorder: Any, lookahead: int, **kwargs: Any) -> Any:
        """Greedy decoding (generate's keywords) that shows `recorder`, a `specmd.sim.record.TraceRecorder`
        observing this model, the self-draft's chain of up to `lookahead` drafts at every decode position: a
        lookahead trace (`specmd.sim.record(..., lookahead=K)` calls this). Returns the token ids as `generate`
        does, plain greedy decoding's. See `specmd.offload_models.speculative.record_lookahead`."""
        from specmd.offload_models.speculative import record_lookahead

        return record_lookahead(self, recorder, lookahead, **kwargs)

    def _runtime(self) -> OffloadRuntime:
        if self._specmd is None:
            raise RuntimeError(
                f"this {type(self).__name__} has no expert cache (closed, or not made by from_pretrained)"
            )
        return self._specmd

    # ---- the cache, for users ------------------------------------------------------------------
    @property
    def expert_cache(self) -> ExpertCache:
        """The live cache: `capacity_bytes`, `resident_bytes`, `resident()`, `warm()`."""
        return self._runtime().manager.cache

    def trace_meta(self) -> dict[str, Any]:
        """What a routing trace's header records about this model (layers, experts, sizes, shape)."""
        return dict(self._runtime().meta)

    @contextmanager
    def observe_routing(self, observer: RoutingObserver) -> Iterator[RoutingObserver]:
        """Tell `observer` every forward pass's routing while inside (`specmd.sim.record` records a trace so)."""
        observers = self._runtime().observers
        if any(o is observer for o in observers):
            raise RuntimeError("this observer already observes the model")
        observers.append(observer)
        try:
            yield observer
        finally:
            observers.remove(observer)

    def cache_stats(self) -> CacheStats:
        """Counters since loading or the last `reset_cache_stats()` (with the self-draft's fast memory, if any)."""
        runtime = self._runtime()
        return runtime.manager.snapshot() if runtime.draft is None else runtime.draft.stats_of(runtime.manager)

    def draft_cache_stats(self) -> CacheStats:
        """The self-draft's own cache counters (its passes, hits and transfers); an error without a draft."""
        draft = self._runtime().draft
        if draft is None:
            raise RuntimeError("this model has no self-draft: load it with draft_frac=... or draft_bytes=...")
        return draft.manager.snapshot()

    @property
    def draft_cache(self) -> ExpertCache:
        """The self-draft's cache (`warm()` it to start with the draft's experts resident)."""
        draft = self._runtime().draft
        if draft is None:
            raise RuntimeError("this model has no self-draft: load it with draft_frac=... or draft_bytes=...")
        return draft.manager.cache

    def reset_cache_stats(self) -> None:
        """Zero the counters (the cache keeps what it holds)."""
        runtime = self._runtime()
        runtime.manager.reset_stats()
        if runtime.draft is not None:
            runtime.draft.manager.reset_stats()

    def close(self) -> None:
        """Stop the watchdog thread and drop the cache; the model cannot run afterwards."""
        runtime, self._specmd = getattr(self, "_specmd", None), None
        if runtime is not None:
            runtime.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "an offloaded model holds no expert weights to save; save the original checkpoint instead"
        )


_PARAMETERS: dict[type, list[str]] = {}


def _forward_parameters(cls: type) -> list[str]:
    """Positional parameter names of the transformers `forward` that `cls` wraps."""
    if cls not in _PARAMETERS:
        wrapped = super(OffloadMixin, cls).forward  # type: ignore[misc]
        _PARAMETERS[cls] = [name for name in inspect.signature(wrapped).parameters if name != "self"]
    return _PARAMETERS[cls]
