"""Built-in demo handlers, registered in REGISTRY on import: "embed", "classify" and "generate",
small but real torch models with clearly different costs (workers/demo_nets.py has the models, their
costs and payloads)."""

from __future__ import annotations

from workers.demo_nets import ByteGenerator, Classifier, TextEmbedder
from workers.registry import REGISTRY, Resources

REGISTRY.handler("embed", max_batch=32, batch_wait_ms=2.0, resources=Resources(num_cpus=0.5))(
    TextEmbedder
)
REGISTRY.handler("classify", max_batch=32, batch_wait_ms=2.0, resources=Resources(num_cpus=0.5))(
    Classifier
)
REGISTRY.handler("generate", resources=Resources(num_cpus=0.5))(ByteGenerator)


__all__ = ["ByteGenerator", "Classifier", "TextEmbedder"]
