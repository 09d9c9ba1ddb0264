"""What a generation streams: `Chunk`s, and the `Decoder` that turns one request's native events
(token ids, a finish reason, per-step statistics) into them. Both engines use it, so stop strings,
UTF-8 holding-back, log-probabilities and decode statistics work one way."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from appliance import _native
from appliance.engine.textstream import TextStream


@dataclass(frozen=True)
class DecodeStats:
    """How a request's tokens were decoded (on the last chunk)."""

    tokens: int = 0  # tokens decided (the last one may be an end-of-generation token)
    layers_run: int = 0  # layer evaluations spent, drafts included
    drafted: int = 0  # lossless: positions drafted
    accepted: int = 0  # lossless: drafted tokens the full model agreed with
    exits: tuple[tuple[int, int], ...] = ()  # (layers run, tokens decided there), ascending

    @property
    def mean_layers(self) -> float:
        return self.layers_run / self.tokens if self.tokens else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def early_tokens(self, n_layer: int) -> int:
        """Tokens decided before the last layer (adaptive) plus drafted tokens kept (lossless)."""
        return self.accepted + sum(n for at, n in self.exits if at < n_layer)


@dataclass(frozen=True)
class Chunk:
    """One step of a streamed generation. text may be empty while a UTF-8 character or a possible
    stop string is held back; finish_reason is set on the last chunk ("stop", "length", or "oom"
    when the KV cache cannot hold the sequence). The last chunk also carries the prompt's token
    count and how many of those the prefix cache served."""

    token: int | None
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    decode: DecodeStats | None = None
    logprob: float | None = None  # SamplingOptions.logprobs: the token's log-probability at temperature 1
    entropy: float | None = None  # ... and the entropy (nats) of the distribution it came from
    # ... and its logit's lead over the best other token it could have been (those the grammar allows,
    # when the request has one): how clearly it won; inf when it was the only choice
    margin: float | None = None


@dataclass(frozen=True)
class Event:
    """A request's share of one engine step, copied out of the native event (safe across threads)."""

    tokens: list[int]
    finish_reason: str
    n_prompt: int
    n_cached: int
    layers_run: int = 0
    drafted: int = 0
    accepted: int = 0
    exit_layers: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()  # per token, when the request asked (SamplingOptions.logprobs)
    entropies: tuple[float, ...] = ()
    margins: tuple[float, ...] = ()

    @classmethod
    def of(cls, ev: _native.Event) -> Event:
        return cls(
            list(ev.tokens),
            ev.finish_reason,
            ev.n_prompt,
            ev.n_prompt_cached,
            ev.layers_run,
            ev.n_drafted,
            ev.n_accepted,
            tuple(ev.exit_layers),
            tuple(ev.logprobs),
            tuple(ev.entropies),
            tuple(ev.margins),
        )


class Decoder:
    """One request's events -> chunks: token text through the stop-string stream, statistics summed.
    `done` turns true once the last chunk was made (finish reason, or a stop string seen)."""

    def __init__(self, vocab: _native.Vocab, stop: tuple[str, ...]) -> None:
        self._vocab = vocab
        self._stream = TextStream(stop)
        self.done = False
        self._tokens = self._layers = self._drafted = self._accepted = 0
        self._exits: dict[int, int] = {}

    def _stats(self) -> DecodeStats:
        exits = tuple(sorted(self._exits.items()))
        return DecodeStats(self._tokens, self._layers, self._drafted, self._accepted, exits)

    def chunks(self, ev: Event) -> Iterator[Chunk]:
        assert not self.done, "events after the last chunk"
        self._tokens += len(ev.exit_layers)
        self._layers += ev.layers_run
        self._drafted += ev.drafted
        self._accepted += ev.accepted
        for at in ev.exit_layers:
            self._exits[at] = self._exits.get(at, 0) + 1
        finished = bool(ev.finish_reason)
        for i, tok in enumerate(ev.tokens):
            text = self._stream.push(self._vocab.token_to_piece(tok))
            lp, ent, mg = (ev.logprobs[i], ev.entropies[i], ev.margins[i]) if ev.logprobs else (None, None, None)
            if self._stream.stopped:
                self.done = True
                yield Chunk(tok, text, "stop", ev.n_prompt, ev.n_cached, self._stats(), lp, ent, mg)
                return
            if finished and i == len(ev.tokens) - 1:
                self.done = True
                text += self._stream.finish()
                yield Chunk(tok, text, ev.finish_reason, ev.n_prompt, ev.n_cached, self._stats(), lp, ent, mg)
            else:
                yield Chunk(tok, text, logprob=lp, entropy=ent, margin=mg)
        if finished and not ev.tokens:
            self.done = True
            yield Chunk(None, self._stream.finish(), ev.finish_reason, ev.n_prompt, ev.n_cached, self._stats())
