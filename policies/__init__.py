"""Pure decision logic for both levels, the simulator and training. Nothing here does I/O."""
