"""Shared test setup: tests run in one process, so state one test leaves in process-wide objects must not
reach the next."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_the_distrifusion_logger():
    """`distrifusion.app.cli.main` run in-process configures the "distrifusion" logger (its own stderr handler,
    no propagation): put it back after each test, or later tests' `caplog` would see nothing and log records
    would go to a stream pytest has closed."""
    own = logging.getLogger("distrifusion")
    saved = own.propagate, list(own.handlers), own.level
    yield
    own.propagate, own.handlers[:] = saved[0], saved[1]
    own.setLevel(saved[2])
