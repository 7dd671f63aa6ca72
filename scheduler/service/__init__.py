"""The live service: level 1's router loop, level 2's controller loop, their leader locks, the Ray
actors that host them, and `start_service` to run it all from Python (the CLI's `serve` uses it)."""
