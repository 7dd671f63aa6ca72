"""Data plane: model workers that drain the queues, and the pool that places them."""
