"""Dispatch simulator: a deterministic discrete-event world (demand, consumers, Islands,
faults) driving a coordinator under test on a virtual clock. See docs/SIMULATOR.md."""
