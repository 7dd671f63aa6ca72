"""Discrete-event simulator: the same policy objects as the live service, on synthetic or real load."""
