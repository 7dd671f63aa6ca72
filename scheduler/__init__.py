"""Control plane: settings, job models, the Redis job store, the client, and the service loops."""
