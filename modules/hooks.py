"""Typed hook points: the only way extensions (and built-in features) reach into a generation.

Each hook point has a dataclass parameter; a hook receives it and may change the fields the
point documents as mutable. The registry belongs to the App (no global state); each extension
registers through the `HookRegistry` it is handed (usually through its `ExtensionAPI`), under its
own name, so an exception inside a hook fails that one job with a message naming the extension.

Besides hook points the registry holds two other kinds of registration:
- extra network types (`<name:args>` prompt tags), as `ExtraNetwork` handlers;
- named data providers (`provide("loras")`), which the HTTP API reads for routes such as
  `/sdapi/v1/loras` without knowing which extension serves them.

Versioning: `API_VERSION` goes up by one only when an existing hook point, field or call changes
in a way that breaks extensions; new hook points and new fields do not change it. An extension
states the version it was written for (`api_version` in `extension.toml`); the loader refuses
one that needs a newer API than this one, or an older one than `MIN_API_VERSION`.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Sequence

from modules.request import RequestError

API_VERSION = 1
MIN_API_VERSION = 1  # the oldest extension API this version still runs unchanged

log = logging.getLogger("athanor.hooks")


class ExtensionError(RuntimeError):
    """A hook raised: the job fails alone and the message names the extension."""

    def __init__(self, extension: str, point: str, exc: BaseException):
        super().__init__(f"Extension {extension!r} failed in {point}: {type(exc).__name__}: {exc}")
        self.extension = extension
        self.point = point
        self.original = exc


# -- the job as extensions see it ---------------------------------------------------------------
@dataclass
class JobContext:
    """One generation job, as hooks, extra networks and scripts see it (A1111's `p`).

    `request` is the job's own copy of the GenerationRequest: scripts may change its fields
    (`p.request.steps = 10`; assignments are validated) or replace it. `extra_generation_params`
    is merged into every image's infotext (`{"Lora hashes": "..."}`). `state` is scratch space
    for the job's lifetime, keyed by whatever the extension likes (its own name is a good key).
    """

    request: Any  # modules.request.GenerationRequest
    model: Any  # modules.model_loader.LoadedModel
    opts: Mapping[str, Any]
    extra_generation_params: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    warn: Callable[[str], None] = log.warning
    process: Callable[[], Any] | None = None  # set by the App: runs the generation for `request`

    @property
    def is_img2img(self) -> bool:
        return getattr(self.request, "kind", "txt2img") == "img2img"

    def process_images(self) -> Any:
        """Run the generation for the current `request` (what A1111's `process_images(p)` does)."""
        if self.process is None:
            raise RuntimeError("This job context cannot run a generation")
        return self.process()


# -- parameters of each hook point --------------------------------------------------------------
@dataclass
class AppStartedParams:
    """Once, when the server is built. Add routes to `server` (a FastAPI app).

    Routes are added before the web page is mounted at `/`, so any path except `/` works.
    `demo` is the Gradio Blocks (None with --nowebui); `app` is the Athanor App.
    """

    server: Any
    demo: Any
    app: Any


@dataclass
class ModelLoadedParams:
    """After a checkpoint is loaded (`model_loaded`) or before it is freed (`model_unloaded`)."""

    model: Any
    title: str


@dataclass
class BeforePromptParseParams:
    """May rewrite `prompts` / `negative_prompts` (one per image) before they are parsed."""

    prompts: list[str]
    negative_prompts: list[str]
    request: Any


@dataclass
class BatchParams:
    """Per batch (`before_process_batch`, then `process_batch`).

    In `before_process_batch`, `prompts` and `negative_prompts` may be changed (adding a
    `<lora:...>` tag works: extra networks are parsed after this point). `process_batch` runs
    after the extra networks of the batch are active; changes to prompts there are ignored.
    """

    job: JobContext
    batch_number: int
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    subseeds: list[int]


@dataclass
class EmbeddingLookupParams:
    """Once per job, before prompts are encoded: append lookups to `lookups`.

    A lookup is `lookup(slot_index, tokens, position) -> (EmbeddingVectors | None, n_tokens)`
    (see modules.conditioning.EmbeddingLookup): it finds an embedding whose name's token ids
    start at `tokens[position]` and says how many prompt tokens it replaces. The first lookup
    that finds something wins.
    """

    job: JobContext
    model: Any
    lookups: list[Callable] = field(default_factory=list)


@dataclass
class TokenEmbeddingsParams:
    """For each 77-token chunk and each text encoder: the token embeddings entering the encoder.

    `embeddings` is the output of the encoder's input-embedding layer, `[1, 77, width]`, with
    textual-inversion vectors already written at their positions; it may be replaced (same shape).
    `tokens` are the chunk's 77 token ids (0 where an embedding sits); `fixes` lists
    `PromptChunkFix(offset, embedding)`, offset counted without the leading BOS token.
    """

    slot_index: int  # 0: first text encoder (CLIP-L), 1: SDXL's second (OpenCLIP bigG)
    tokens: list[int]
    fixes: list
    embeddings: Any


@dataclass
class ConditioningParams:
    """After one chunk is encoded and emphasis applied: `z` `[1, 77, width]` may be replaced."""

    chunk_index: int
    tokens: list[int]
    multipliers: list[float]
    z: Any


@dataclass(frozen=True)
class AttentionSite:
    """Which attention module a key/value transform is called for."""

    name: str  # module path in the UNet, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    is_cross: bool  # cross-attention (context = the prompt) rather than self-attention
    context_dim: int  # width of the context fed to to_k / to_v


# transform(site, context_k, context_v) -> (context_k, context_v): changes what to_k / to_v see.
KVTransform = Callable[[AttentionSite, Any, Any], tuple[Any, Any]]


@dataclass
class AttentionParams:
    """Per batch, after extra networks are active: append `KVTransform`s to `transforms`.

    While the list is not empty, every attention module of the UNet runs its original processor
    with the transforms applied, in order, to the inputs of its `to_k` and `to_v` projections
    (never to `to_q`). The original processors come back when the job ends.
    """

    job: JobContext
    model: Any
    transforms: list[KVTransform] = field(default_factory=list)


@dataclass(frozen=True)
class WeightDelta:
    """Add `delta` to `module.<name>` (a parameter) while the job runs.

    `delta` is a tensor of the parameter's shape (or a function returning one, computed only
    when applied); several deltas on one parameter add up. The sum is formed in float32 and cast
    to the parameter's dtype; the original tensor is kept aside and put back unchanged, so the
    weights are bit-identical after the job. `key` identifies the delta (e.g. the LoRA and its
    multipliers): when a batch asks for exactly the same keys as the previous one, nothing is
    recomputed.
    """

    module: Any  # torch.nn.Module
    name: str  # "weight" or "bias"
    delta: Any  # torch.Tensor | Callable[[], torch.Tensor]
    key: Hashable


@dataclass
class WeightsPatchParams:
    """Per batch, after extra networks are active: append `WeightDelta`s to `deltas`."""

    job: JobContext
    model: Any
    deltas: list[WeightDelta] = field(default_factory=list)


@dataclass
class CFGDenoiserParams:
    """Before the UNet call of one step. `x`, `image_cond`, `text_cond` and `text_uncond` may be replaced."""

    x: Any
    image_cond: Any
    timestep: Any
    sampling_step: int
    total_sampling_steps: int
    text_cond: list  # per image: list of (Conditioning, weight)
    text_uncond: list  # per image: Conditioning


@dataclass
class AfterCFGParams:
    """After classifier-free guidance of one step. `x` (the guided model output) may be replaced."""

    x: Any
    sampling_step: int
    total_sampling_steps: int


@dataclass
class PostprocessImageParams:
    """Each generated image, after decoding and before infotext and saving. `image` may be replaced."""

    job: JobContext
    batch_number: int
    index: int  # position in the batch
    image: Any  # PIL.Image.Image


@dataclass
class BeforeImageSavedParams:
    """May replace `image` or edit `infotext` before the file is written."""

    image: Any
    infotext: str
    seed: int
    kind: str  # "txt2img" | "img2img"


@dataclass
class ImageSavedParams:
    image: Any
    filename: str
    infotext: str


@dataclass
class PostprocessParams:
    """After the whole job (all batches): `result` is the GenerationResult and may be edited."""

    job: JobContext
    result: Any


@dataclass
class UiTab:
    """A top-level tab added by an extension.

    `build()` is called inside `gr.Tab(title)` and creates the tab's components. For an A1111-style
    tab made as its own `gr.Blocks`, pass it as `blocks` instead; it is rendered in the tab.
    """

    title: str
    build: Callable[[], Any] | None = None
    elem_id: str = ""
    blocks: Any = None


@dataclass
class UiTabsParams:
    """When the page is built: append `UiTab`s to `tabs`."""

    tabs: list[UiTab] = field(default_factory=list)


@dataclass
class UiSettingsParams:
    """Once after extensions are loaded: add settings with `add_option(key, OptionInfo(...))`.

    The options appear in config.json, in the settings page and in `/sdapi/v1/options`, and jobs
    read them from their settings snapshot (`job.opts[key]`).
    """

    options: Any  # modules.options.Options

    def add_option(self, key: str, info: Any) -> None:
        self.options.add_option(key, info)


HOOK_POINTS: dict[str, type] = {
    "app_started": AppStartedParams,
    "model_loaded": ModelLoadedParams,
    "model_unloaded": ModelLoadedParams,
    "before_prompt_parse": BeforePromptParseParams,
    "before_process_batch": BatchParams,
    "process_batch": BatchParams,
    "embedding_lookup": EmbeddingLookupParams,
    "token_embeddings": TokenEmbeddingsParams,
    "conditioning": ConditioningParams,
    "weights_patch": WeightsPatchParams,
    "attention": AttentionParams,
    "cfg_denoiser": CFGDenoiserParams,
    "cfg_after_cfg": AfterCFGParams,
    "postprocess_image": PostprocessImageParams,
    "before_image_saved": BeforeImageSavedParams,
    "image_saved": ImageSavedParams,
    "postprocess": PostprocessParams,
    "ui_tabs": UiTabsParams,
    "ui_settings": UiSettingsParams,
}


# -- extra networks -----------------------------------------------------------------------------
class ExtraNetwork:
    """Handler of one `<name:args>` prompt tag type (A1111's `ExtraNetwork`).

    `activate(job, params_list)` is called for every batch with the tags of the batch's first
    prompt (`ExtraNetworkParams` with `.items`, `.positional`, `.named`), and with an empty list
    when the batch does not mention this network, so it must then switch itself off.
    `deactivate(job)` is called once when the job ends (also when it failed).
    """

    def __init__(self, name: str):
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"Extra network name {name!r} must be a word (letters, digits, _)")
        self.name = name

    def activate(self, job: JobContext, params_list: list) -> None:
        pass

    def deactivate(self, job: JobContext) -> None:
        pass


@dataclass
class _Registration:
    extension: str
    fn: Callable[..., Any]


@dataclass
class HookRegistry:
    """The App's registry of hooks, extra network handlers and data providers."""

    _hooks: dict[str, list[_Registration]] = field(default_factory=dict)
    _networks: dict[str, tuple[str, ExtraNetwork]] = field(default_factory=dict)
    _providers: dict[str, _Registration] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- hook points ----------------------------------------------------------------------
    def register(self, point: str, fn: Callable[[Any], Any], *, extension: str = "core") -> Callable:
        """Call `fn(params)` at `point`; returns `fn` so it can be used as a decorator body."""
        if point not in HOOK_POINTS:
            raise ValueError(f"Unknown hook point {point!r}; known points: {', '.join(sorted(HOOK_POINTS))}")
        if not callable(fn):
            raise TypeError(f"hook for {point!r} must be callable, got {type(fn).__name__}")
        with self._lock:
            self._hooks.setdefault(point, []).append(_Registration(extension, fn))
        return fn

    def on(self, point: str, *, extension: str = "core") -> Callable:
        """Decorator form: `@registry.on("cfg_denoiser", extension="mine")`."""
        def wrap(fn):
            return self.register(point, fn, extension=extension)
        return wrap

    def unregister_extension(self, extension: str) -> None:
        """Drop everything `extension` registered (its load failed half-way, or it was unloaded)."""
        with self._lock:
            for point, regs in self._hooks.items():
                self._hooks[point] = [r for r in regs if r.extension != extension]
            self._networks = {k: v for k, v in self._networks.items() if v[0] != extension}
            self._providers = {k: v for k, v in self._providers.items() if v.extension != extension}

    def has(self, point: str) -> bool:
        return bool(self._hooks.get(point))

    def extensions_at(self, point: str) -> list[str]:
        """Names of the extensions with a hook at `point`, in call order."""
        return [r.extension for r in self._hooks.get(point, ())]

    def registrations(self, point: str) -> list[tuple[str, Callable]]:
        """(extension, hook) pairs of `point` in call order."""
        return [(r.extension, r.fn) for r in self._hooks.get(point, ())]

    def run(self, point: str, params: Any) -> Any:
        """Call every hook of `point` in registration order; returns `params` (possibly changed)."""
        expected = HOOK_POINTS[point]
        if not isinstance(params, expected):
            raise TypeError(f"hook {point!r} takes {expected.__name__}, got {type(params).__name__}")
        for reg in list(self._hooks.get(point, ())):
            guarded(reg.extension, f"hook {point!r}", reg.fn, params)
        return params

    # -- extra networks -------------------------------------------------------------------
    def register_extra_network(self, handler: ExtraNetwork, *, extension: str = "core") -> ExtraNetwork:
        """Handle `<handler.name:...>` tags. A second handler for the same name is refused."""
        if not isinstance(handler, ExtraNetwork):
            raise TypeError("an extra network handler must be an ExtraNetwork instance")
        with self._lock:
            owner = self._networks.get(handler.name)
            if owner is not None and owner[0] != extension:
                raise ValueError(f"Extra network {handler.name!r} is already handled by extension {owner[0]!r}")
            self._networks[handler.name] = (extension, handler)
        return handler

    def extra_networks(self) -> list[tuple[str, ExtraNetwork]]:
        """(extension, handler) pairs in registration order."""
        return list(self._networks.values())

    def extra_network_names(self) -> frozenset[str]:
        return frozenset(self._networks)

    # -- data providers -------------------------------------------------------------------
    def register_provider(self, name: str, fn: Callable[..., Any], *, extension: str = "core") -> Callable:
        """Serve `provide(name)` (e.g. "embeddings", "loras", "refresh-loras") with `fn()`."""
        with self._lock:
            self._providers[name] = _Registration(extension, fn)
        return fn

    def providers(self) -> list[str]:
        return sorted(self._providers)

    def provide(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """What provider `name` returns, or None when no loaded extension provides it."""
        reg = self._providers.get(name)
        if reg is None:
            return None
        return guarded(reg.extension, f"provider {name!r}", reg.fn, *args, **kwargs)


def guarded(extension: str, where: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call an extension's function; any exception becomes an ExtensionError naming the extension."""
    try:
        return fn(*args, **kwargs)
    except (ExtensionError, RequestError):
        raise  # a request over the limits (a script's generation) is the user's input, not the extension's bug
    except Exception as exc:  # noqa: BLE001 - any extension failure fails this job only
        raise ExtensionError(extension, where, exc) from exc


def compose_lookups(lookups: Sequence[Callable]) -> Callable | None:
    """One embedding lookup out of several: the first that finds an embedding wins."""
    if not lookups:
        return None
    if len(lookups) == 1:
        return lookups[0]

    def lookup(slot_index, tokens, position):
        for fn in lookups:
            embedding, used = fn(slot_index, tokens, position)
            if embedding is not None:
                return embedding, used
        return None, 0
    return lookup
