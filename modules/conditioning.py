"""Prompt text -> text-encoder conditioning, with A1111's tokenization rules.

For each weighted piece of a prompt (from `prompt_parser.parse_prompt_attention`):
tokenize without BOS/EOS, fill 75-token chunks (a comma within the last `comma_padding_backtrack`
tokens moves the tail to the next chunk; BREAK closes a chunk), wrap each chunk as
[BOS] + 75 + [EOS] (padding after the first EOS with the encoder's pad id), encode each chunk
separately, apply the emphasis multipliers, and concatenate the chunks along the token axis.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from modules import prompt_parser

CHUNK_LENGTH = 75
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


@dataclass(frozen=True)
class EmbeddingVectors:
    """A textual-inversion embedding as the tokenizer sees it (supplied by an extension)."""

    name: str
    vectors: torch.Tensor  # [n_vectors, dim]; for SDXL a dict per encoder is resolved before this point

    @property
    def length(self) -> int:
        vectors = self.vectors
        if isinstance(vectors, dict):  # SDXL: {"clip_l": [n, 768], "clip_g": [n, 1280]}, same n
            vectors = next(iter(vectors.values()))
        return int(vectors.shape[0])


@dataclass
class PromptChunkFix:
    offset: int  # position inside the 75 tokens (0-based, BOS not counted)
    embedding: EmbeddingVectors


@dataclass
class PromptChunk:
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[PromptChunkFix] = field(default_factory=list)


# Finds an embedding whose token sequence starts at `position` in `tokens`:
# returns (embedding, number of prompt tokens it replaces) or (None, 0).
EmbeddingLookup = Callable[[int, Sequence[int], int], tuple[EmbeddingVectors | None, int]]


@dataclass(frozen=True)
class Conditioning:
    """One encoded prompt: the cross-attention context and, for SDXL, the pooled vector."""

    context: torch.Tensor  # [1, 77*k, dim]
    pooled: torch.Tensor | None = None  # [1, dim2] (SDXL)

    @property
    def length(self) -> int:
        return int(self.context.shape[1])


@dataclass(frozen=True)
class EncoderSlot:
    """One text encoder of a model and how A1111 reads its output."""

    tokenizer: object
    encoder: torch.nn.Module
    pad_id: int
    mode: str  # "sd1": last layer or clip skip + final norm; "final": last_hidden_state;
    #            "penultimate": hidden_states[-2] without final norm (SDXL)
    pooled: bool = False  # contributes the pooled output (SDXL's second encoder)


def encoder_slots(model) -> list[EncoderSlot]:
    """How to read each text encoder of a loaded model, per A1111's embedders."""
    family = model.family
    tokenizers, encoders = model.tokenizers, model.text_encoders
    if family.is_sdxl:
        return [
            EncoderSlot(tokenizers[0], encoders[0], tokenizers[0].eos_token_id, "penultimate"),
            EncoderSlot(tokenizers[1], encoders[1], 0, "penultimate", pooled=True),
        ]
    if family.name.startswith("sd2"):
        return [EncoderSlot(tokenizers[0], encoders[0], 0, "final")]
    return [EncoderSlot(tokenizers[0], encoders[0], tokenizers[0].eos_token_id, "sd1")]


class PromptEncoder:
    """Encodes prompts for one job; identical texts are encoded once."""

    def __init__(self, model, opts: Mapping, *, device: torch.device, dtype: torch.dtype,
                 embedding_lookup: EmbeddingLookup | None = None,
                 chunk_hooks: Sequence[Callable] = (), hooks=None):
        self.slots = encoder_slots(model)
        self.opts = opts
        self.device = device
        self.dtype = dtype
        self.embedding_lookup = embedding_lookup
        self.chunk_hooks = tuple(chunk_hooks)
        self.hooks = hooks  # HookRegistry: "token_embeddings" and "conditioning" points
        tok = self.slots[0].tokenizer
        self.id_start = tok.bos_token_id
        self.id_end = tok.eos_token_id
        self.comma_token = tok.get_vocab().get(",</w>")
        self._cache: dict[str, Conditioning] = {}
        self.used_embeddings: dict[str, EmbeddingVectors] = {}

    # -- tokenization -----------------------------------------------------------------------
    def parse(self, text: str) -> list[list]:
        mode = self.opts.get("emphasis", "Original")
        if mode == "None":
            return [[text, 1.0]]
        parsed = prompt_parser.parse_prompt_attention(text)
        if mode == "Ignore":
            parsed = [[piece, 1.0 if not (piece == "BREAK" and w == -1) else -1] for piece, w in parsed]
        return parsed

    def tokenize_line(self, text: str) -> tuple[list[PromptChunk], int]:
        """A1111's `tokenize_line`: returns the chunks and the token count shown in the UI."""
        parsed = self.parse(text)
        tokenizer = self.slots[0].tokenizer
        tokenized = tokenizer([piece for piece, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
        backtrack = int(self.opts.get("comma_padding_backtrack", 20))

        chunks: list[PromptChunk] = []
        chunk = PromptChunk()
        token_count = 0
        last_comma = -1

        def next_chunk(is_last: bool = False) -> None:
            nonlocal token_count, last_comma, chunk
            token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
            to_add = CHUNK_LENGTH - len(chunk.tokens)
            if to_add > 0:
                chunk.tokens += [self.id_end] * to_add
                chunk.multipliers += [1.0] * to_add
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
            last_comma = -1
            chunks.append(chunk)
            chunk = PromptChunk()

        for tokens, (piece, weight) in zip(tokenized, parsed):
            if piece == "BREAK" and weight == -1:
                next_chunk()
                continue
            position = 0
            while position < len(tokens):
                token = tokens[position]
                if token == self.comma_token:
                    last_comma = len(chunk.tokens)
                elif (backtrack != 0 and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                      and len(chunk.tokens) - last_comma <= backtrack):
                    # Move the words after the last comma to the next chunk, so a phrase is not cut in two.
                    cut = last_comma + 1
                    moved_tokens, moved_mults = chunk.tokens[cut:], chunk.multipliers[cut:]
                    chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                    next_chunk()
                    chunk.tokens, chunk.multipliers = moved_tokens, moved_mults
                if len(chunk.tokens) == CHUNK_LENGTH:
                    next_chunk()

                embedding, used = (None, 0)
                if self.embedding_lookup is not None:
                    embedding, used = self.embedding_lookup(0, tokens, position)
                if embedding is None:
                    chunk.tokens.append(token)
                    chunk.multipliers.append(weight)
                    position += 1
                    continue
                # An embedding never straddles two chunks.
                if len(chunk.tokens) + embedding.length > CHUNK_LENGTH:
                    next_chunk()
                chunk.fixes.append(PromptChunkFix(len(chunk.tokens), embedding))
                chunk.tokens += [0] * embedding.length
                chunk.multipliers += [weight] * embedding.length
                self.used_embeddings[embedding.name] = embedding
                position += used

        if chunk.tokens or not chunks:
            next_chunk(is_last=True)
        return chunks, token_count

    def token_count(self, text: str) -> tuple[int, int]:
        """(tokens used, capacity) for the UI counter `count/75·k`."""
        _, count = self.tokenize_line(text)
        return count, max(1, -(-count // CHUNK_LENGTH)) * CHUNK_LENGTH

    # -- encoding ---------------------------------------------------------------------------
    def _encode_chunk(self, slot_index: int, slot: EncoderSlot, chunk: PromptChunk,
                      clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = list(chunk.tokens)
        if slot.pad_id != self.id_end:
            first_end = tokens.index(self.id_end)
            tokens[first_end + 1:] = [slot.pad_id] * (len(tokens) - first_end - 1)
        ids = torch.tensor([tokens], device=self.device)
        encoder = slot.encoder

        handle = None
        fixes = [fix for fix in chunk.fixes if _vectors_for(fix.embedding, slot_index) is not None]
        hooked = self.hooks is not None and self.hooks.has("token_embeddings")
        if fixes or hooked:
            def put_embeddings(_module, _inputs, output):
                output = output.clone()
                for fix in fixes:
                    vec = _vectors_for(fix.embedding, slot_index).to(output.device, output.dtype)
                    start = fix.offset + 1  # +1 for BOS
                    output[0, start:start + vec.shape[0]] = vec[: output.shape[1] - start]
                if hooked:
                    from modules.hooks import TokenEmbeddingsParams
                    output = self.hooks.run("token_embeddings", TokenEmbeddingsParams(
                        slot_index, list(chunk.tokens), list(chunk.fixes), output)).embeddings
                return output
            handle = encoder.get_input_embeddings().register_forward_hook(put_embeddings)
        try:
            out = encoder(input_ids=ids, output_hidden_states=True)
        finally:
            if handle is not None:
                handle.remove()

        if slot.mode == "penultimate":
            z = out.hidden_states[-2]
        elif slot.mode == "sd1" and clip_skip > 1:
            # a clip skip deeper than the encoder (12 on a 2-layer model) stops at its first layer's output
            z = encoder.final_layer_norm(out.hidden_states[-min(clip_skip, len(out.hidden_states) - 1)])
        else:
            z = out.last_hidden_state
        pooled = getattr(out, "text_embeds", None) if slot.pooled else None
        return z, pooled

    def _encode_chunks(self, chunks: list[PromptChunk]) -> Conditioning:
        clip_skip = int(self.opts.get("CLIP_stop_at_last_layers", 1))
        mode = self.opts.get("emphasis", "Original")
        zs = []
        pooled_first = None
        for chunk_index, chunk in enumerate(chunks):
            parts = []
            for slot_index, slot in enumerate(self.slots):
                z, pooled = self._encode_chunk(slot_index, slot, chunk, clip_skip)
                parts.append(z)
                if pooled is not None and chunk_index == 0:
                    pooled_first = pooled  # A1111 takes SDXL's pooled vector from the first chunk
            z = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
            z = apply_emphasis(z, torch.tensor(chunk.multipliers, device=z.device, dtype=z.dtype), mode)
            for hook in self.chunk_hooks:
                replaced = hook(chunk, z)
                if replaced is not None:
                    z = replaced
            if self.hooks is not None and self.hooks.has("conditioning"):
                from modules.hooks import ConditioningParams
                z = self.hooks.run("conditioning", ConditioningParams(chunk_index, list(chunk.tokens),
                                                                      list(chunk.multipliers), z)).z
            zs.append(z)
        return Conditioning(torch.cat(zs, dim=1).to(self.dtype), None if pooled_first is None else pooled_first.to(self.dtype))

    @torch.inference_mode()
    def encode(self, text: str) -> Conditioning:
        cached = self._cache.get(text)
        if cached is None:
            chunks, _ = self.tokenize_line(text)
            cached = self._cache[text] = self._encode_chunks(chunks)
        return cached

    def empty_chunk(self) -> Conditioning:
        return self.encode("")

    def clear_cache(self) -> None:
        """Forget encoded prompts (the text encoder's weights changed, e.g. a LoRA was applied)."""
        self._cache.clear()


def _vectors_for(embedding: EmbeddingVectors, slot_index: int) -> torch.Tensor | None:
    vectors = embedding.vectors
    if isinstance(vectors, dict):  # SDXL embeddings carry one tensor per encoder
        return vectors.get(("clip_l", "clip_g")[slot_index])
    return vectors if slot_index == 0 else None


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor, mode: str) -> torch.Tensor:
    """Scale token vectors by their weights. "Original" restores the chunk's mean afterwards."""
    if mode in ("Ignore", "None") or bool((multipliers == 1).all()):
        return z  # all weights 1: scaling and mean restore are the identity
    weighted = z * multipliers.reshape(1, -1, 1)
    if mode == "No norm":
        return weighted
    original_mean, new_mean = z.mean(), weighted.mean()
    if new_mean == 0:
        return weighted
    return weighted * (original_mean / new_mean)


def pad_to_length(context: torch.Tensor, length: int) -> torch.Tensor:
    """A1111's equalization of AND subprompts: repeat the last token vector."""
    missing = length - context.shape[1]
    if missing <= 0:
        return context
    return torch.cat([context, context[:, -1:].repeat(1, missing, 1)], dim=1)


# -- schedules ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScheduledConditioning:
    end_at_step: int
    cond: Conditioning


@dataclass(frozen=True)
class PromptSchedule:
    """All conditionings of one prompt over the sampling steps (prompt editing, alternation)."""

    entries: tuple[ScheduledConditioning, ...]

    def at_step(self, step: int) -> Conditioning:
        """A1111's rule: the first entry whose end_at_step >= the 0-based step."""
        for entry in self.entries:
            if step <= entry.end_at_step:
                return entry.cond
        return self.entries[-1].cond


@dataclass(frozen=True)
class MultiCondSchedule:
    """A positive prompt split on AND: (schedule, weight) per subprompt."""

    parts: tuple[tuple[PromptSchedule, float], ...]


def schedule_prompt(encoder: PromptEncoder, text: str, steps: int, hires_steps: int | None = None) -> PromptSchedule:
    old = bool(encoder.opts.get("use_old_scheduling", False))
    schedule = prompt_parser.get_learned_conditioning_prompt_schedules([text], steps, hires_steps, old)[0]
    return PromptSchedule(tuple(ScheduledConditioning(int(end), encoder.encode(t)) for end, t in schedule))


def schedule_multicond(encoder: PromptEncoder, text: str, steps: int, hires_steps: int | None = None) -> MultiCondSchedule:
    res_indexes, flat, _ = prompt_parser.get_multicond_prompt_list([text])
    parts = []
    for index, weight in res_indexes[0]:
        parts.append((schedule_prompt(encoder, flat[index], steps, hires_steps), float(weight)))
    return MultiCondSchedule(tuple(parts))
