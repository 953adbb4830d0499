"""Fuzzing with a fixed seed and a small budget (scripts/fuzz runs the same targets for long).

Each target (tests/support/fuzz.py) states its property; here every target
gets a fixed number of inputs from seed FUZZ_SEED, so a failure replays.
"""

import logging

import pytest

from support import fuzz

FUZZ_SEED = 14
# Inputs per target: a few seconds in all on a loaded 2-core machine.
BUDGET = {"decoder": 1500, "decoder-split": 60, "connect-payload": 20000, "console": 800,
          "commands": 4000, "config": 800, "device-link": 120, "server-link": 30}

pytestmark = pytest.mark.faults


@pytest.fixture(autouse=True)
def _quiet(caplog):
    # Hostile frames make many warnings; the properties are checked, not the lines.
    caplog.set_level(logging.CRITICAL, logger="tcprc")


@pytest.mark.parametrize("target", fuzz.targets(), ids=lambda t: t.name)
def test_fuzz(target):
    try:
        outcome = fuzz.run(target, FUZZ_SEED, seconds=60, max_inputs=BUDGET[target.name])
    finally:
        getattr(target, "close", lambda: None)()
    assert outcome.tried == BUDGET[target.name]
    assert not outcome.failures, "%d of %d inputs failed; first: %s on %r" % (
        len(outcome.failures), outcome.tried, outcome.failures[0][1], outcome.failures[0][0])
