"""Our decode loop: a preallocated KV cache with one slot per sequence, so that sequences of any
length decode side by side, and so that a server can add a request to a running batch or drop one
from it between two steps (continuous batching).

transformers' `generate` grows its cache by concatenation every step, rebuilds the attention mask
from the whole padding mask every step, and runs one batch from its first token to its last. Here:

* `SlotCache` holds, per layer, a (slots, kv_heads, capacity, head_dim) tensor of keys and one of
  values, allocated once. Slot i holds one sequence: its prompt left-padded at indices
  start[i] .. length[i]-1, each new token at index length[i]. RoPE positions count from start[i],
  so a sequence decodes exactly as it would alone.
* `Decoder` owns the model and the cache. `add` prefills new sequences in one forward pass;
  `step` runs one forward pass, one new token, for every running sequence. A sequence that ends
  (an end-of-turn id, its token budget, a stop string, or `cancel`) leaves at once, and the last
  running slot moves into its place, so the running sequences are always slots 0 .. n-1 and every
  forward runs on a plain slice of the cache.
* `warp`, `penalize` and `choose` turn logits into next tokens: greedy, temperature, top-k,
  top-p, repetition penalty, each setting per sequence; sampling draws from a sequence's own
  `torch.Generator` when it has one, so a seeded reply repeats whatever runs beside it.
* `TextStream` turns a sequence's tokens into text pieces as they come and ends the text before
  the first stop string.
* `generate` is the batch from start to end, shaped as transformers' `generate` returns it.

The attention layers only call `cache.update(keys, values, layer_idx)`, and the mask arrives as a
4-D boolean tensor (transformers' models take one as it is), so the loop drives MiniMind and any
transformers decoder that uses the `Cache` interface (Llama, Qwen2, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------

def cache_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a MiniMind or transformers decoder config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


class SlotCache:
    """Keys and values of up to `slots` sequences of up to `capacity` tokens each, allocated once.

    A forward pass first calls `prepare(rows, seq_len)`: the slots it runs on, where its tokens go,
    their positions and their mask. Each attention layer then calls `update`, which writes the new
    keys/values in place and returns the keys/values the queries attend over: the first `key_len`
    indices, the longest row's (eager), or all `capacity` (static shapes, for CUDA graphs).
    """

    def __init__(self, config, slots: int, capacity: int, device: torch.device, dtype: torch.dtype):
        layers, kv_heads, head_dim = cache_shape(config)
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.start = torch.zeros(slots, dtype=torch.long, device=device)  # first index holding a token
        self.length = torch.zeros(slots, dtype=torch.long, device=device)  # indices written so far
        self.capacity = capacity
        self.rows, self.key_len, self.past_len, self.write_index = slice(0, 0), 0, 0, None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def prepare(self, rows: slice, seq_len: int, static_shapes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Set up a forward of `seq_len` new tokens for the slots `rows`; returns their RoPE positions
        (B, T) and the boolean (B, 1, T, keys) mask of which cache index each may see: its own row's
        tokens from `start` up to itself. A padding query also sees itself, so no row of the mask is
        all False (which would make the softmax NaN)."""
        start, length = self.start[rows], self.length[rows]
        index = length[:, None] + torch.arange(seq_len, device=length.device)  # (B, T) cache index of each new token
        self.key_len = self.capacity if static_shapes else int(index.max()) + 1
        self.past_len = self.key_len - seq_len
        key_index = torch.arange(self.key_len, device=length.device)
        sees = (key_index >= start[:, None, None]) & (key_index <= index[:, :, None])
        sees |= key_index == index[:, :, None]
        self.rows, self.write_index = rows, index
        return (index - start[:, None]).clamp(min=0), sees[:, None]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *cache_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, kv_heads, T, D) keys/values at their rows' next indices; return what the
        queries attend over. Called by every attention layer (MiniMind's and transformers')."""
        index = self.write_index[:, None, :, None].expand_as(key)
        keys, values = self.keys[layer_idx][self.rows], self.values[layer_idx][self.rows]
        keys.scatter_(2, index, key.to(keys.dtype))
        values.scatter_(2, index, value.to(values.dtype))
        return keys[:, :, :self.key_len].to(key.dtype), values[:, :, :self.key_len].to(value.dtype)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Cache indices before the new tokens (transformers' name); the positions come from `prepare`."""
        return self.past_len

    def move(self, source: int, target: int) -> None:
        """Copy slot `source` into slot `target` (only the indices it has written)."""
        used = int(self.length[source])
        for tensor in self.keys + self.values:
            tensor[target, :, :used] = tensor[source, :, :used]
        self.start[target], self.length[target] = self.start[source], self.length[source]


# ---------------------------------------------------------------------------------------------
# Choosing the next token
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 and top_p 1 = no cut; repetition_penalty 1 = none."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """The CTRL paper's repetition penalty: every token already in the row (`seen`, boolean (B, V))
    becomes less likely, a positive logit divided by the row's penalty, a negative one multiplied."""
    penalized = torch.where(logits < 0, logits * penalty[:, None], logits / penalty[:, None])
    return torch.where(seen, penalized, logits)


def warp(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Next-token probabilities (B, V) after each row's temperature, then top-k (keep the k most
    likely; 0 = all), then top-p (keep the most likely tokens until their mass reaches p, at least
    one; 1 = all), the top-p mass measured on the top-k distribution."""
    scores, order = (logits / temperature[:, None]).sort(dim=-1, descending=True)
    rank = torch.arange(scores.shape[-1], device=scores.device)
    scores = scores.masked_fill((top_k[:, None] > 0) & (rank >= top_k[:, None]), float("-inf"))
    probs = scores.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # the mass of the more likely tokens
    beyond_p = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1) & (rank > 0)
    probs = scores.masked_fill(beyond_p, float("-inf")).softmax(-1)
    return torch.zeros_like(probs).scatter_(-1, order, probs)


def choose(logits: torch.Tensor, settings: list[Sampling], seen: torch.Tensor,
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """The next token of each row: greedy where temperature is 0, else drawn from `warp`'s
    probabilities with the row's generator (rows without one share torch's global generator)."""
    logits = logits.float()
    if any(s.repetition_penalty != 1.0 for s in settings):
        logits = penalize(logits, seen, logits.new_tensor([s.repetition_penalty for s in settings]))
    greedy = logits.argmax(-1)
    sampled_rows = [i for i, s in enumerate(settings) if s.temperature > 0]
    if not sampled_rows:
        return greedy
    rows = torch.tensor(sampled_rows, device=logits.device)
    chosen = [settings[i] for i in sampled_rows]
    probs = warp(logits[rows], logits.new_tensor([s.temperature for s in chosen]),
                 torch.tensor([s.top_k for s in chosen], device=logits.device),
                 logits.new_tensor([s.top_p for s in chosen]))
    shared = [k for k, i in enumerate(sampled_rows) if generators[i] is None]
    draws = torch.empty(len(sampled_rows), dtype=torch.long, device=logits.device)
    if shared:
        draws[shared] = torch.multinomial(probs[shared], 1).squeeze(-1)
    for k, i in enumerate(sampled_rows):
        if generators[i] is not None:
            draws[k] = torch.multinomial(probs[k], 1, generator=generators[i])[0]
    return greedy.index_copy(0, rows, draws)


# ---------------------------------------------------------------------------------------------
# Text as it is written
# ---------------------------------------------------------------------------------------------

class TextStream:
    """A sequence's text, piece by piece while tokens arrive. A piece is given out once its bytes
    form whole characters (a Chinese character is often several byte-level tokens): only the tokens
    since the last complete piece are decoded, as vLLM's incremental detokenizer does. Text that
    could be the start of a stop string is held back until it cannot; at the first stop string the
    text ends and `stopped` is set."""

    def __init__(self, tokenizer, stop_strings: list[str] | None = None):
        self.tokenizer, self.stop_strings = tokenizer, [s for s in stop_strings or [] if s]
        self.prefix_offset = self.read_offset = 0  # tokens [prefix, read) decode to the last piece read
        self.held, self.ready, self.stopped = "", "", False

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def feed(self, tokens: list[int]) -> None:
        """Read `tokens` (all generated so far, the newest last)."""
        if self.stopped:
            return
        known = self._decode(tokens[self.prefix_offset:self.read_offset])
        text = self._decode(tokens[self.prefix_offset:])
        if len(text) > len(known) and not text.endswith("\ufffd"):
            self._add(text[len(known):])
            self.prefix_offset, self.read_offset = self.read_offset, len(tokens)

    def _add(self, piece: str) -> None:
        self.held += piece
        found = [self.held.find(stop) for stop in self.stop_strings if stop in self.held]
        if found:
            self.ready += self.held[:min(found)]
            self.held, self.stopped = "", True
            return
        keep = max((n for stop in self.stop_strings for n in range(len(stop) - 1, 0, -1)
                    if self.held.endswith(stop[:n])), default=0)
        self.ready += self.held[:len(self.held) - keep]
        self.held = self.held[len(self.held) - keep:]

    def finish(self, tokens: list[int]) -> None:
        """The sequence has ended: give out what was held back, an incomplete character included."""
        if not self.stopped:
            known = self._decode(tokens[self.prefix_offset:self.read_offset])
            self._add(self._decode(tokens[self.prefix_offset:])[len(known):])
        if not self.stopped:
            self.ready += self.held
            self.held = ""

    def take(self) -> str:
        """The text not yet taken."""
        piece, self.ready = self.ready, ""
        return piece


# ---------------------------------------------------------------------------------------------
# Sequences and the decoder
# ---------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Sequence:
    """One prompt being answered. `tokens` are the generated ids, the end-of-turn id included when
    it came; `finish_reason` is "stop" (an end-of-turn id or a stop string), "length" (max_new_tokens)
    or "cancelled" once it has left the decoder."""
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    text: TextStream | None = None  # set to stream text and to honour stop strings
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def completion(self) -> list[int]:
        """The generated ids without the end-of-turn id."""
        return self.tokens[:-1] if self.tokens and self.tokens[-1] in self.stop_ids else self.tokens


class Decoder:
    """The model with a `SlotCache` of `slots` sequences of up to `capacity` tokens (prompt + reply).

    `static_shapes` (default: on CUDA) runs every decode step on all slots over the whole capacity,
    so that the step has one shape and `torch.compile(mode="reduce-overhead")` can capture it as a
    CUDA graph; on CPU, eager steps over only the running rows and the keys in use are faster.
    """

    def __init__(self, model: torch.nn.Module, slots: int, capacity: int, static_shapes: bool | None = None):
        self.model = model
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.cache = SlotCache(model.config, slots, capacity, device, dtype)
        self.static_shapes = device.type == "cuda" if static_shapes is None else static_shapes
        self.step_forward = torch.compile(model, mode="reduce-overhead") if self.static_shapes and device.type == "cuda" \
            else model
        self.seen = torch.zeros(slots, model.config.vocab_size, dtype=torch.bool, device=device)  # for the penalty
        self.running: list[Sequence] = []  # running[i] lives in slot i

    @property
    def slots(self) -> int:
        return self.seen.shape[0]

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.running)

    def _logits(self, forward, rows: slice, input_ids: torch.Tensor, static_shapes: bool) -> torch.Tensor:
        positions, sees = self.cache.prepare(rows, input_ids.shape[1], static_shapes)
        output = forward(input_ids=input_ids, attention_mask=sees, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache.length[rows] += input_ids.shape[1]
        return output.logits[:, -1]

    @torch.inference_mode()
    def add(self, sequences: list[Sequence]) -> None:
        """Prefill `sequences` (left-padded into one batch, one forward pass) into free slots and
        choose their first tokens: they take part in the next `step`."""
        if len(sequences) > self.free_slots:
            raise ValueError(f"{len(sequences)} sequences but {self.free_slots} free slots")
        for sequence in sequences:
            if not sequence.prompt or len(sequence.prompt) + sequence.max_new_tokens > self.cache.capacity:
                raise ValueError(f"a prompt of {len(sequence.prompt)} tokens + {sequence.max_new_tokens} new ones "
                                 f"does not fit the cache's {self.cache.capacity} tokens per sequence")
        if not sequences:
            return
        first = len(self.running)
        rows = slice(first, first + len(sequences))
        width = max(len(sequence.prompt) for sequence in sequences)
        # padding is masked out, so any id does
        input_ids = torch.zeros((len(sequences), width), dtype=torch.long, device=self.seen.device)
        self.seen[rows] = False
        for row, sequence in enumerate(sequences):
            prompt = torch.tensor(sequence.prompt, device=input_ids.device)
            input_ids[row, width - len(prompt):] = prompt
            self.seen[first + row, prompt] = True
        self.cache.start[rows] = width - torch.tensor([len(s.prompt) for s in sequences], device=input_ids.device)
        self.cache.length[rows] = 0
        self.running += sequences
        self._advance(rows, self._logits(self.model, rows, input_ids, static_shapes=False))

    @torch.inference_mode()
    def step(self) -> None:
        """One forward pass, one new token, for every running sequence."""
        if not self.running:
            return
        last = [sequence.tokens[-1] for sequence in self.running]
        rows = slice(0, self.slots if self.static_shapes else len(last))
        if self.static_shapes:  # idle slots compute too: at index 0, seeing only themselves
            self.cache.start[len(last):], self.cache.length[len(last):] = 0, 0
        input_ids = torch.zeros((rows.stop, 1), dtype=torch.long, device=self.seen.device)
        input_ids[:len(last), 0] = torch.tensor(last, device=input_ids.device)
        logits = self._logits(self.step_forward, rows, input_ids, self.static_shapes)
        self._advance(slice(0, len(last)), logits[:len(last)])

    def _advance(self, rows: slice, logits: torch.Tensor) -> None:
        """Append each row's next token; sequences that end leave."""
        sequences = self.running[rows]
        tokens = choose(logits, [s.sampling for s in sequences], self.seen[rows], [s.generator for s in sequences])
        self.seen[rows].scatter_(1, tokens[:, None], True)
        for sequence, token in zip(sequences, tokens.tolist()):
            sequence.tokens.append(token)
            if sequence.text is not None:
                sequence.text.feed(sequence.completion)
            if token in sequence.stop_ids or (sequence.text is not None and sequence.text.stopped):
                self.finish(sequence, "stop")
            elif len(sequence.tokens) >= sequence.max_new_tokens:
                self.finish(sequence, "length")

    def finish(self, sequence: Sequence, reason: str = "cancelled") -> None:
        """`sequence` leaves now (a no-op if it has left); the last running slot moves into its slot."""
        if sequence not in self.running:
            return
        slot, last = self.running.index(sequence), len(self.running) - 1
        if slot != last:
            self.cache.move(last, slot)
            self.seen[slot] = self.seen[last]
            self.running[slot] = self.running[last]
        self.running.pop()
        sequence.finish_reason = reason
        if sequence.text is not None:
            sequence.text.finish(sequence.completion)


def generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int, sampling: Sampling = Sampling(), stop_ids: tuple[int, ...] = (),
             pad_token_id: int = 0, generator: torch.Generator | None = None,
             static_shapes: bool | None = None) -> torch.Tensor:
    """Answer a left-padded batch as transformers' `generate` does and in its shape: the prompts as
    given, then each row's tokens (its stop id included) padded with `pad_token_id` to the longest.
    Sampling draws from `generator`, or from torch's global generator when None."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    prompts = [row[keep.bool()].tolist() for row, keep in zip(input_ids, mask)]
    decoder = Decoder(model, slots=len(prompts), capacity=max(map(len, prompts)) + max_new_tokens,
                      static_shapes=static_shapes)
    sequences = [Sequence(prompt, max_new_tokens, sampling, frozenset(stop_ids), generator) for prompt in prompts]
    decoder.add(sequences)
    while decoder.running:
        decoder.step()
    width = max(len(sequence.tokens) for sequence in sequences)
    generated = torch.full((len(sequences), width), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    for row, sequence in enumerate(sequences):
        generated[row, :len(sequence.tokens)] = torch.tensor(sequence.tokens)
    return torch.cat([input_ids, generated], dim=1)
