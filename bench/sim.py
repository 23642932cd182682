"""Simulated Jobs per wall second: the real scheduler, ledger and routing driven by the
dispatch simulator vs the bare queue model on the same demand, and their ratio.

    python -m bench sim [--jobs N] [--scenario NAME] [--repeat R] [--seed S] [--profile]

The implementation lives with the simulator (simulations/bench.py); see docs/SIMULATOR.md
("Speed").
"""

from __future__ import annotations

from simulations.bench import main

__all__ = ["main"]
