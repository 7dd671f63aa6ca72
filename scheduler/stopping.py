"""Ctrl-C and SIGTERM as a request to stop training cleanly, not a crash that loses the run.

`StopSignals` turns the first SIGINT or SIGTERM into a flag; the rollout executors
(`scheduler.training`) look at it between rollouts and while they wait for Ray, and raise
`policies.learned.ppo.TrainingStopped`, which `train` hands back with the best policy validated so
far. The exception is raised only there, never from inside the signal handler, so it cannot land
halfway through an update of what training keeps. A second signal quits at once, without writing.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

# The signals that ask a run to stop: Ctrl-C, and what `kill`, systemd and Kubernetes send.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While entered, the first SIGINT or SIGTERM sets `signum` and calls `on_request(signum)`;
    the next one raises KeyboardInterrupt (quit now), unless `hold()` was called, after which
    signals are only recorded (the results are being written, which takes a moment). Leaving
    restores the handlers that ours replaced last (Ray's, when `ray.init` ran in between)."""

    def __init__(self, on_request: Callable[[int], None] | None = None) -> None:
        self.signum: int | None = None
        self.on_request = on_request
        self._held = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    def exit_code(self) -> int:
        """The shell's code for death by the signal received: 128 + its number (130 for SIGINT)."""
        assert self.signum is not None
        return 128 + self.signum

    def name(self) -> str:
        """The received signal's name, e.g. SIGINT."""
        assert self.signum is not None
        return signal.Signals(self.signum).name

    def hold(self) -> None:
        """From now on a signal is recorded and nothing else: what is left is a short write."""
        self._held = True

    def install(self) -> None:
        """(Re)installs the handlers: `ray.init` sets its own SIGTERM handler, which must not win
        (it exits without letting the run write anything)."""
        for signum in STOP_SIGNALS:
            previous = signal.signal(signum, self._handle)
            if previous != self._handle:
                self._previous[signum] = previous

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._held:
            self.signum = self.signum or signum
            return
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.on_request is not None:
            self.on_request(signum)

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
