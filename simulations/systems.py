"""Which coordinator the simulator drives.

* ``bare-queue``: ``simulations.baseline.BareQueue`` (no rules; always available);
* ``real``: the real scheduler, ledger and routing through ``simulations.real`` (a module
  exposing ``make_system() -> SystemUnderTest``);
* ``auto`` (default): ``real`` when it can be imported, else ``bare-queue`` (the run's
  report and metrics name the system that actually ran).
"""

from __future__ import annotations

import importlib

from simulations.system import SystemUnderTest

NAMES = ("auto", "real", "bare-queue")


class SystemUnavailable(RuntimeError):
    pass


def real_available() -> bool:
    try:
        importlib.import_module("simulations.real")
    except ImportError:
        return False
    return True


def make_system(name: str = "auto") -> SystemUnderTest:
    if name == "bare-queue":
        from simulations.baseline import BareQueue

        return BareQueue()
    if name in ("real", "auto"):
        try:
            mod = importlib.import_module("simulations.real")
        except ImportError as exc:
            if name == "auto" and exc.name == "simulations.real":
                return make_system("bare-queue")
            raise SystemUnavailable(f"the real system is not available yet: {exc}") from None
        return mod.make_system()
    raise SystemUnavailable(f"unknown system {name!r}; known: {', '.join(NAMES)}")
