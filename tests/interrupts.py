"""Interrupting a run in tests as Ctrl-C does: a listener that raises KeyboardInterrupt after a given round."""

import pytest


def stop_after(round_index):
    """A listener that interrupts the run once ``round_index`` has been recorded (as a kernel interrupt would)."""
    def listener(record):
        if record.round == round_index:
            raise KeyboardInterrupt
    return listener


def interrupted(sim):
    """Run ``sim`` into its interrupt: run() records the run as aborted and checkpoints it, then re-raises;
    the aborted run is the exception's ``.run``."""
    with pytest.raises(KeyboardInterrupt) as e:
        sim.run(progress=False)
    return e.value.run
