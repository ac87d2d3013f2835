"""What the hook API does to a model while one job runs, and undoes when it ends.

- `WeightPatcher`: adds `WeightDelta`s (LoRA) to parameters, in float32, keeping each original
  tensor aside; `restore()` puts the very same tensors back, so the weights are bit-identical.
- `AttentionPatcher`: wraps every attention processor of the UNet so `KVTransform`s
  (hypernetworks) change what `to_k` / `to_v` see; `restore()` reinstalls the original processors.
- `JobSession`: one job's run of the extension machinery: extra networks per batch, scripts,
  embedding lookups, the two patchers above. processing.py calls `begin_batch` and
  `postprocess_image`; the App runs the job inside `with session:` so everything is undone even
  when the job fails.
- `start_job` makes a job's `JobSession` from the loader's registries; `run_app_started` runs the
  `app_started` hook when the server is built. The loader (modules.extensions) only fills the registries:
  what the loaded extensions do at run time lives here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from modules import extra_networks
from modules.hooks import (
    AppStartedParams,
    AttentionParams,
    AttentionSite,
    BatchParams,
    EmbeddingLookupParams,
    ExtensionError,
    HookRegistry,
    JobContext,
    KVTransform,
    PostprocessImageParams,
    PostprocessParams,
    WeightDelta,
    WeightsPatchParams,
    compose_lookups,
    guarded,
)
from modules.scripts import PostprocessImageArgs, ScriptRegistry, ScriptRun

if TYPE_CHECKING:  # only for the hints: the loader never needs this module, nor this module the loader
    from modules.extensions import ExtensionManager

log = logging.getLogger("athanor.extensions")


# -- weights --------------------------------------------------------------------------------------
class WeightPatcher:
    """Applies weight deltas to a model's parameters and restores the originals exactly."""

    def __init__(self) -> None:
        self._originals: dict[tuple[int, str], tuple[torch.nn.Module, str, torch.Tensor]] = {}
        self._applied_keys: tuple = ()

    @property
    def active(self) -> bool:
        return bool(self._originals)

    def apply(self, deltas: list[WeightDelta], owners: list[str] | None = None) -> bool:
        """Make the model carry exactly `deltas` (on top of its original weights).

        Returns True when the weights changed. The same list of keys as last time is a no-op.
        `owners` (one extension name per delta) names the extension in errors.
        """
        keys = tuple((id(d.module), d.name, d.key) for d in deltas)
        if keys == self._applied_keys:
            return False
        had_any = self.active
        self.restore()
        grouped: dict[tuple[int, str], list[tuple[WeightDelta, str]]] = {}
        for index, delta in enumerate(deltas):
            grouped.setdefault((id(delta.module), delta.name), []).append(
                (delta, owners[index] if owners else "core"))
        try:
            with torch.no_grad():
                for (_, name), items in grouped.items():
                    module = items[0][0].module
                    param = getattr(module, name, None)
                    if not isinstance(param, torch.Tensor):
                        raise ValueError(f"{type(module).__name__} has no tensor {name!r} to patch")
                    original = param.data
                    total = original.to(torch.float32, copy=True)
                    for delta, owner in items:
                        value = guarded(owner, "weights patch", delta.delta) if callable(delta.delta) else delta.delta
                        value = value.to(device=total.device, dtype=torch.float32)
                        if value.shape != total.shape:
                            if value.numel() != total.numel():
                                raise ExtensionError(owner, "weights patch", ValueError(
                                    f"delta of shape {tuple(value.shape)} does not fit {name} of shape "
                                    f"{tuple(total.shape)}"))
                            value = value.reshape(total.shape)
                        total += value
                    self._originals[(id(module), name)] = (module, name, original)
                    param.data = total.to(original.dtype)
        except BaseException:
            self.restore()
            raise
        self._applied_keys = keys
        return bool(deltas) or had_any

    def restore(self) -> None:
        """Put every original tensor back (the same objects, so the values are bit-identical)."""
        for module, name, original in self._originals.values():
            getattr(module, name).data = original
        self._originals.clear()
        self._applied_keys = ()


# -- attention ------------------------------------------------------------------------------------
class _KVProxy:
    """Stands in for an Attention module while its processor runs: `to_k`/`to_v` see transformed input."""

    def __init__(self, attn, site: AttentionSite, transforms: list[tuple[str, KVTransform]]):
        self._attn = attn
        self._site = site
        self._transforms = transforms
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, context for v)

    def __getattr__(self, name):
        return getattr(self._attn, name)

    def _contexts(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context_k = context_v = context
        for owner, transform in self._transforms:
            context_k, context_v = guarded(owner, "attention hook", transform, self._site, context_k, context_v)
        return context_k, context_v

    def to_k(self, context: torch.Tensor) -> torch.Tensor:
        context_k, context_v = self._contexts(context)
        self._last = (context, context_v)  # processors call to_k then to_v on the same tensor
        return self._attn.to_k(context_k)

    def to_v(self, context: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0] is context:
            context_v = self._last[1]
        else:
            context_v = self._contexts(context)[1]
        self._last = None
        return self._attn.to_v(context_v)


class _KVProcessor:
    """Wraps an attention module's original processor; the transforms list is shared and live."""

    def __init__(self, original, site: AttentionSite, transforms: list[tuple[str, KVTransform]]):
        self.original = original
        self.site = site
        self.transforms = transforms

    # Attention.forward passes only the keyword arguments a processor's signature names, so temb is spelled out.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if temb is not None:
            kwargs["temb"] = temb
        target = _KVProxy(attn, self.site, self.transforms) if self.transforms else attn
        return self.original(target, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **kwargs)


class AttentionPatcher:
    """Installs key/value transforms on a diffusers UNet through its attention-processor API."""

    def __init__(self, unet) -> None:
        self.unet = unet
        self._originals: dict[str, Any] | None = None
        self._transforms: list[tuple[str, KVTransform]] = []

    @property
    def installed(self) -> bool:
        return self._originals is not None

    def set(self, transforms: list[tuple[str, KVTransform]]) -> None:
        """Use exactly these (owner, transform) pairs from now on; an empty list restores the originals."""
        if not transforms:
            self.restore()
            return
        self._transforms[:] = transforms
        if self._originals is None:
            originals = dict(self.unet.attn_processors)
            modules = dict(self.unet.named_modules())
            wrapped = {}
            for key, processor in originals.items():
                module_name = key[: -len(".processor")]
                attn = modules[module_name]
                to_k = getattr(attn, "to_k", None)
                site = AttentionSite(name=module_name,
                                     is_cross=bool(getattr(attn, "is_cross_attention", module_name.endswith("attn2"))),
                                     context_dim=int(getattr(to_k, "in_features", 0) or 0))
                wrapped[key] = _KVProcessor(processor, site, self._transforms)
            self.unet.set_attn_processor(wrapped)
            self._originals = originals

    def restore(self) -> None:
        self._transforms.clear()
        if self._originals is not None:
            self.unet.set_attn_processor(dict(self._originals))
            self._originals = None


# -- one job --------------------------------------------------------------------------------------
@dataclass
class BatchSetup:
    """What processing needs to know after `begin_batch`."""

    prompts: list[str]
    negative_prompts: list[str]
    weights_changed: bool  # cached prompt encodings from earlier batches are stale


@dataclass
class JobSession:
    """The extension machinery for one job. Use as a context manager around the generation."""

    hooks: HookRegistry
    job: JobContext
    scripts: ScriptRun = field(default_factory=ScriptRun)
    _weights: WeightPatcher = field(default_factory=WeightPatcher)
    _attention: AttentionPatcher | None = None
    _networks_touched: bool = False

    def __enter__(self) -> "JobSession":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failing=exc is not None)

    # -- set-up -------------------------------------------------------------------------------
    def embedding_lookup(self) -> Callable | None:
        """The job's textual-inversion lookup, composed from every `embedding_lookup` hook."""
        found: list[Callable] = []
        for extension, fn in self.hooks.registrations("embedding_lookup"):
            params = EmbeddingLookupParams(self.job, self.job.model, [])
            guarded(extension, "hook 'embedding_lookup'", fn, params)
            found += [_named_lookup(extension, lookup) for lookup in params.lookups]
        return compose_lookups(found)

    def run(self, process: Callable[[], Any]) -> Any:
        """Run the job: always-on scripts' set-up, the selectable script or `process`, then postprocess."""
        self.job.process = process
        for script, args in self.scripts.alwayson:
            for method in ("setup", "before_process", "process"):
                self._script_call(script, method, self.job, **args)
        if self.scripts.selectable is not None:
            script, args = self.scripts.selectable
            result = self._script_call(script, "run", self.job, **args)
            if result is None:
                raise ExtensionError(script.extension, f"script {script.title()!r}",
                                     ValueError("run() returned no result; it must return p.process_images()"))
        else:
            result = process()
        for script, args in self.scripts.alwayson:
            self._script_call(script, "postprocess", self.job, result, **args)
        if self.hooks.has("postprocess"):
            self.hooks.run("postprocess", PostprocessParams(self.job, result))
        return result

    # -- per batch ------------------------------------------------------------------------------
    def begin_batch(self, batch_number: int, prompts: list[str], negative_prompts: list[str],
                    seeds: list[int], subseeds: list[int]) -> BatchSetup:
        """Before a batch is encoded: scripts and hooks, extra networks, weight and attention patches."""
        batch = BatchParams(self.job, batch_number, list(prompts), list(negative_prompts), list(seeds),
                            list(subseeds))
        self.hooks.run("before_process_batch", batch)
        for script, args in self.scripts.alwayson:
            self._script_call(script, "before_process_batch", self.job, batch, **args)

        # A1111: the first prompt's tags decide; every handler is activated, unmentioned ones with [].
        _, networks = extra_networks.parse_prompts(batch.prompts)
        networks = networks or {}
        for extension, handler in self.hooks.extra_networks():
            self._networks_touched = True
            guarded(extension, f"extra network {handler.name!r}", handler.activate, self.job,
                    list(networks.get(handler.name, [])))

        after = BatchParams(self.job, batch_number, list(batch.prompts), list(batch.negative_prompts),
                            batch.seeds, batch.subseeds)
        self.hooks.run("process_batch", after)
        for script, args in self.scripts.alwayson:
            self._script_call(script, "process_batch", self.job, after, **args)

        changed = self._patch_weights()
        self._patch_attention()
        return BatchSetup(batch.prompts, batch.negative_prompts, changed)

    def _patch_weights(self) -> bool:
        deltas: list[WeightDelta] = []
        owners: list[str] = []
        for extension, fn in self.hooks.registrations("weights_patch"):
            params = WeightsPatchParams(self.job, self.job.model, [])
            guarded(extension, "hook 'weights_patch'", fn, params)
            deltas += params.deltas
            owners += [extension] * len(params.deltas)
        return self._weights.apply(deltas, owners)

    def _patch_attention(self) -> None:
        transforms: list[tuple[str, KVTransform]] = []
        for extension, fn in self.hooks.registrations("attention"):
            params = AttentionParams(self.job, self.job.model, [])
            guarded(extension, "hook 'attention'", fn, params)
            transforms += [(extension, t) for t in params.transforms]
        if not transforms and self._attention is None:
            return
        if self._attention is None:
            self._attention = AttentionPatcher(self.job.model.unet)
        self._attention.set(transforms)

    def postprocess_image(self, batch_number: int, index: int, image: Any) -> Any:
        """Each decoded image: `postprocess_image` hooks and scripts may replace it."""
        if self.hooks.has("postprocess_image"):
            image = self.hooks.run("postprocess_image", PostprocessImageParams(self.job, batch_number, index,
                                                                               image)).image
        if self.scripts.alwayson:
            pp = PostprocessImageArgs(image, batch_number, index)
            for script, args in self.scripts.alwayson:
                self._script_call(script, "postprocess_image", self.job, pp, **args)
            image = pp.image
        return image

    # -- tear-down ------------------------------------------------------------------------------
    def close(self, *, failing: bool = False) -> None:
        """Undo every patch and deactivate the extra networks (also after a failure)."""
        error: BaseException | None = None
        try:
            self._weights.restore()
        finally:
            if self._attention is not None:
                self._attention.restore()
        if self._networks_touched:
            for extension, handler in self.hooks.extra_networks():
                try:
                    guarded(extension, f"extra network {handler.name!r}", handler.deactivate, self.job)
                except ExtensionError as exc:
                    log.error("%s", exc)
                    error = error or exc
        if error is not None and not failing:
            raise error

    def _script_call(self, script, method: str, *args, **kwargs) -> Any:
        return guarded(script.extension, f"script {script.title()!r} ({method})", getattr(script, method),
                       *args, **kwargs)


def _named_lookup(extension: str, lookup: Callable) -> Callable:
    def named(slot_index, tokens, position):
        return guarded(extension, "embedding lookup", lookup, slot_index, tokens, position)
    return named


# -- the loaded extensions at work --------------------------------------------------------------------
def start_job(hooks: HookRegistry, scripts: ScriptRegistry, request: Any, ctx: Any) -> JobSession:
    """Prepare one job: its JobContext (with a copy of the request), scripts and extension session.

    The copy is shallow: scripts assign fields (`p.request.steps = 10`) rather than change lists in place.
    Sets `ctx.job_session`, `ctx.embedding_lookup` and `ctx.known_networks`. Run the generation
    as `with session: session.run(lambda: process(make_plan(session.job.request), ctx))`.
    Raises ValueError for unknown scripts or bad script arguments.
    """
    run = scripts.resolve(request)
    job = JobContext(request=request.model_copy(), model=ctx.model, opts=ctx.opts,
                     extra_generation_params=ctx.extra_generation_params, warn=ctx.warn)
    session = JobSession(hooks, job, run)
    ctx.job_session = session
    ctx.known_networks = hooks.extra_network_names()
    ctx.embedding_lookup = session.embedding_lookup()
    return session


def embedding_lookup_for_model(hooks: HookRegistry, model: Any, opts: Any) -> Callable | None:
    """The textual-inversion lookup for `model` outside a job (e.g. a token counter); `opts`: a settings snapshot."""
    return JobSession(hooks, JobContext(request=None, model=model, opts=opts)).embedding_lookup()


def run_app_started(extensions: "ExtensionManager", server: Any, demo: Any, app: Any) -> None:
    """Call `app_started` hooks (they add routes); a failing one is reported, the server starts."""
    for extension, fn in extensions.hooks.registrations("app_started"):
        try:
            guarded(extension, "hook 'app_started'", fn, AppStartedParams(server, demo, app))
        except ExtensionError as exc:
            extensions.mark_failed(extension, str(exc))
