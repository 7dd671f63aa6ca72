"""Learned policies: an equivariant torch allocator (level 2) and router (level 1), their rollouts
and their training loop. Pure like the rest of `policies`: no files, no Redis, no Ray."""
