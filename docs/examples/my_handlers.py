"""Handlers of my own: a sentiment scorer (one text per call) and a text embedder (batched).

Serve them with the config beside this file, from this directory:

    bilevel serve --config my_service.yaml

`bilevel serve` finds this module in the directory it starts in and, since it is not installed,
ships that directory (this file, lexicon.txt, my_service.yaml) to every node as Ray's working_dir:
the workers of a `ray up` cluster import this same code. See docs/handlers.md.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from workers.registry import REGISTRY, PayloadError, Resources

# Read by the loader from the worker's copy of this directory: data files travel with the code.
LEXICON = Path(__file__).with_name("lexicon.txt")
EMBEDDING_DIM = 64
HASH_BUCKETS = 4096
MAX_TEXT_CHARS = 10_000


def _text(payload: Any) -> str:
    if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
        # PayloadError: retrying cannot help, so the worker dead-letters the job at once.
        raise PayloadError('payload must be {"text": "..."}')
    text: str = payload["text"]
    if len(text) > MAX_TEXT_CHARS:
        raise PayloadError(f"text is longer than {MAX_TEXT_CHARS} characters")
    return text


def _words(text: str) -> list[str]:
    return [w for w in (w.strip(".,;:!?\"'()").lower() for w in text.split()) if w]


def load_lexicon() -> dict[str, float]:
    """The model: word -> polarity in [-1, 1], from lexicon.txt. Loaded once per worker; the time it
    takes is the queue's model-load cost, which level 2 weighs before it moves a worker."""
    lexicon = {}
    for line in LEXICON.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            word, score = line.split()
            lexicon[word] = float(score)
    return lexicon


@REGISTRY.handler("sentiment", loader=load_lexicon, resources=Resources(num_cpus=0.5))
def sentiment(lexicon: dict[str, float], payload: Any) -> dict[str, Any]:
    """One text -> its mean polarity over the words the lexicon knows, and a label."""
    scores = [lexicon[w] for w in _words(_text(payload)) if w in lexicon]
    score = sum(scores) / len(scores) if scores else 0.0
    label = "positive" if score > 0.1 else "negative" if score < -0.1 else "neutral"
    return {"score": round(score, 4), "label": label, "matched": len(scores)}


@REGISTRY.handler(
    "embed_text",
    # Up to 32 jobs per call; once a worker holds one job it waits up to 5 ms for more.
    max_batch=32,
    batch_wait_ms=5.0,
    # Each worker on this queue reserves half a CPU and 256 MiB in Ray. gpu_fraction=0.25 would
    # put four such workers on one GPU (on a node that has one).
    resources=Resources(num_cpus=0.5, gpu_fraction=0.0, memory_mb=256),
)
class Embedder:
    """A batched handler as a class: constructing it is the model load, and `run_batch` serves a
    whole batch in one call (one matrix product), which is why batching pays."""

    def __init__(self) -> None:
        # Fixed weights: a text embeds the same on every worker.
        rng = np.random.default_rng(0)
        self.projection = rng.standard_normal((HASH_BUCKETS, EMBEDDING_DIM))
        self.projection /= math.sqrt(EMBEDDING_DIM)

    def run_batch(self, payloads: list[Any]) -> list[list[float]]:
        """Unit vectors of EMBEDDING_DIM floats, one per payload, in order (zeros for no words)."""
        counts = np.zeros((len(payloads), HASH_BUCKETS))
        for row, payload in enumerate(payloads):
            for word in _words(_text(payload)):
                # crc32, not hash(): it is the same in every process.
                counts[row, zlib.crc32(word.encode()) % HASH_BUCKETS] += 1.0
        vectors = counts @ self.projection
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
        return [[round(float(x), 6) for x in v] for v in vectors]
