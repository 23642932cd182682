"""The reference Island agent (docs/ISLANDS.md): `agent.py` (connection, reconnects,
leases, drain), `backends.py` (echo, openai, image), `png.py` (PNG writer and the
procedural picture). Imports nothing of the coordinator but `protocol/island.py`."""
