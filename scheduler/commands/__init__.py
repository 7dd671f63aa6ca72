"""Sub-commands of the `bilevel` CLI, one module each; each exposes `register(app)`."""
