"""The built-in demo models as plain torch modules (workers/demo_models.py registers them as the
"embed", "classify" and "generate" handlers; `bilevel replay` runs them where a scenario says so).

They are small but real torch models with clearly different costs, so scheduling decisions matter:

| job type | load (2-core CPU) | per job              | payload                                   |
|----------|-------------------|----------------------|-------------------------------------------|
| embed    | ~0.15 s           | ~0.6 ms, batched (32) | {"text": str} → list of 128 floats        |
| classify | ~0.5 s            | ~0.2 ms, batched (32) | {"features": [16 floats]} or {"text": str} → {"label", "scores"} |
| generate | ~1.3 s            | ~6 ms per token      | {"prompt": str, "max_tokens": int} → str, streamed |

Weights are made at load time from a seeded torch.Generator (no downloads), so every worker holds
the same model and results are reproducible. The load time comes from building the weights the way
real models initialise (large tables, orthogonal recurrent matrices via QR) plus a warm-up pass,
not from sleeping. Bad payloads raise PayloadError (a ValueError) naming the field.

"generate" streams: each sampled token (one printable character) is a chunk, and the job's result
is the whole text, as before (`handle.result()` is unchanged; `handle.stream()` gives the tokens as
they are sampled).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Generator, Iterator
from typing import Any

import torch
from torch import nn

from workers.registry import PayloadError

# Token hashing: crc32 is stable across processes (Python's hash() is salted per process).
_EMBED_BUCKETS = 1 << 17
_EMBED_DIM = 128
_CLASSIFY_FEATURES = 16
_CLASSIFY_LABELS = ("negative", "neutral", "positive", "question")
_MAX_TEXT_CHARS = 10_000
_MAX_PROMPT_CHARS = 2_000
_MAX_NEW_TOKENS = 512
# Generated text is printable ASCII, so results read as text (the weights are random).
_PRINTABLE = torch.arange(32, 127)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthogonal_(weight: torch.Tensor, gen: torch.Generator) -> None:
    with torch.no_grad():
        nn.init.orthogonal_(weight, generator=gen)


def _init_linear(layer: nn.Linear, gen: torch.Generator) -> None:
    with torch.no_grad():
        bound = 1.0 / math.sqrt(layer.in_features)
        layer.weight.uniform_(-bound, bound, generator=gen)
        if layer.bias is not None:
            layer.bias.zero_()


def _text(payload: Any, field: str = "text", limit: int = _MAX_TEXT_CHARS) -> str:
    if not isinstance(payload, dict):
        raise PayloadError(
            f"payload must be an object with {field!r}, got {type(payload).__name__}"
        )
    value = payload.get(field)
    if not isinstance(value, str):
        raise PayloadError(f"payload.{field} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise PayloadError(
            f"payload.{field} has {len(value)} characters, over the limit of {limit}"
        )
    return value


def _token_ids(text: str) -> list[int]:
    words = text.lower().split() or [""]
    return [zlib.crc32(w.encode()) % _EMBED_BUCKETS for w in words]


def _bags(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token ids and bag offsets for nn.EmbeddingBag."""
    ids: list[int] = []
    offsets: list[int] = []
    for text in texts:
        offsets.append(len(ids))
        ids.extend(_token_ids(text))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


class TextEmbedder(nn.Module):
    """Mean of hashed-token embeddings through a two-layer MLP, L2-normalised."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__()
        gen = _generator(seed)
        self.table = nn.EmbeddingBag(_EMBED_BUCKETS, _EMBED_DIM, mode="mean")
        self.hidden = nn.Linear(_EMBED_DIM, 512)
        self.out = nn.Linear(512, _EMBED_DIM)
        with torch.no_grad():
            self.table.weight.normal_(0.0, 1.0, generator=gen)
        _orthogonal_(self.hidden.weight, gen)
        _orthogonal_(self.out.weight, gen)
        self.eval()

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        x = self.table(ids, offsets)
        x = self.out(torch.tanh(self.hidden(x)))
        return nn.functional.normalize(x, dim=-1)

    def run_batch(self, payloads: list[Any]) -> list[list[float]]:
        texts = [_text(p) for p in payloads]
        with torch.inference_mode():
            vectors = self(*_bags(texts))
        return [[round(v, 6) for v in row] for row in vectors.tolist()]


class Classifier(nn.Module):
    """A wide MLP over 16 features (or hashed text embedded to 16 features) to 4 labels."""

    def __init__(self, seed: int = 2) -> None:
        super().__init__()
        gen = _generator(seed)
        self.text_table = nn.EmbeddingBag(_EMBED_BUCKETS, _CLASSIFY_FEATURES, mode="mean")
        self.inp = nn.Linear(_CLASSIFY_FEATURES, 2048)
        self.mid = nn.Linear(2048, 2048)
        self.head = nn.Linear(2048, len(_CLASSIFY_LABELS))
        with torch.no_grad():
            self.text_table.weight.normal_(0.0, 1.0, generator=gen)
        _init_linear(self.inp, gen)
        _orthogonal_(self.mid.weight, gen)
        _init_linear(self.head, gen)
        self.eval()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp(features))
        x = torch.relu(self.mid(x)) + x
        return torch.softmax(self.head(x), dim=-1)

    def _features(self, payload: Any) -> torch.Tensor:
        if not isinstance(payload, dict) or ("features" in payload) == ("text" in payload):
            raise PayloadError('payload must be an object with exactly one of "features", "text"')
        if "text" in payload:
            with torch.inference_mode():
                embedded: torch.Tensor = self.text_table(*_bags([_text(payload)]))
                return embedded[0]
        features = payload["features"]
        if (
            not isinstance(features, list)
            or len(features) != _CLASSIFY_FEATURES
            or not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in features)
        ):
            raise PayloadError(f"payload.features must be a list of {_CLASSIFY_FEATURES} numbers")
        return torch.tensor(features, dtype=torch.float32)

    def run_batch(self, payloads: list[Any]) -> list[dict[str, Any]]:
        rows = torch.stack([self._features(p) for p in payloads])
        with torch.inference_mode():
            probs = self(rows)
        out: list[dict[str, Any]] = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            scores = {label: round(p, 6) for label, p in zip(_CLASSIFY_LABELS, row, strict=True)}
            out.append({"label": _CLASSIFY_LABELS[best], "scores": scores})
        return out


class ByteGenerator(nn.Module):
    """A two-layer GRU language model over bytes; sampling is seeded by the prompt."""

    def __init__(self, seed: int = 3, hidden: int = 1536) -> None:
        super().__init__()
        gen = _generator(seed)
        self.embed = nn.Embedding(256, 512)
        self.gru = nn.GRU(512, hidden, num_layers=2, batch_first=True)
        self.out = nn.Linear(hidden, 256)
        with torch.no_grad():
            self.embed.weight.normal_(0.0, 1.0, generator=gen)
            for name, param in self.gru.named_parameters():
                if name.startswith("weight_hh"):
                    # Orthogonal recurrent matrices keep the state from exploding or vanishing;
                    # one QR per gate, as recurrent models are commonly initialised.
                    for gate in param.chunk(3, dim=0):
                        _orthogonal_(gate, gen)
                elif name.startswith("weight_ih"):
                    nn.init.xavier_uniform_(param, generator=gen)
                else:
                    param.zero_()
        _init_linear(self.out, gen)
        self.eval()
        self.generate("warm-up", 4)

    def generate(self, prompt: str, max_tokens: int) -> str:
        return "".join(self.tokens(prompt, max_tokens))

    def tokens(self, prompt: str, max_tokens: int) -> Iterator[str]:
        """The sampled tokens one by one (one printable character each), as they are sampled."""
        gen = _generator(zlib.crc32(prompt.encode()))
        data = list(prompt.encode()) or [32]
        with torch.inference_mode():
            x, state = self.gru(self.embed(torch.tensor([data])))
            for _ in range(max_tokens):
                logits = self.out(x[0, -1])[_PRINTABLE]
                probs = torch.softmax(logits / 0.8, dim=-1)
                byte = int(_PRINTABLE[int(torch.multinomial(probs, 1, generator=gen))])
                yield chr(byte)
                x, state = self.gru(self.embed(torch.tensor([[byte]])), state)

    def run(self, payload: Any) -> str:
        return self.generate(*_prompt_and_length(payload))

    def run_stream(self, payload: Any) -> Generator[str, None, str]:
        """Stream the tokens; the job's result is the whole text, as `run` returns it."""
        prompt, max_tokens = _prompt_and_length(payload)
        text: list[str] = []
        for token in self.tokens(prompt, max_tokens):
            text.append(token)
            yield token
        return "".join(text)


def _prompt_and_length(payload: Any) -> tuple[str, int]:
    prompt = _text(payload, "prompt", _MAX_PROMPT_CHARS)
    max_tokens = payload.get("max_tokens", 32)
    if (
        not isinstance(max_tokens, int)
        or isinstance(max_tokens, bool)
        or not 1 <= max_tokens <= _MAX_NEW_TOKENS
    ):
        raise PayloadError(f"payload.max_tokens must be an integer in 1..{_MAX_NEW_TOKENS}")
    return prompt, max_tokens


__all__ = ["ByteGenerator", "Classifier", "TextEmbedder"]
