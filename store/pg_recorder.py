"""PostgreSQL application recorder with a cheaper insert.

The library inserts a batch as one array of a composite type; psycopg dumps composite
arrays in Python, row by row, which measured as a quarter of the writer thread's time
under load. This subclass sends four arrays of plain types instead (uuid[], bigint[],
text[], bytea[]), in the binary parameter format (`%b`), each built whole per batch by
`store/pg_arrays.py` rather than by psycopg's element-by-element list dumper. The text
format quotes and escapes every element (a regex per bytea value); it measured 9x the cost
of psycopg's binary list dumping, which in turn costs more than the packed arrays
(`python -m bench pg_params`; docs/PERFORMANCE.md). Everything else — the EXCLUSIVE table
lock that makes commit order equal notification order, NOTIFY, RETURNING the
notification ids in insert order — is the library's own code path, except that the ids
are read back as tuples (`tuple_row`) instead of one dict per row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import ProgrammingError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier

from store import pg_arrays


class FastPostgresApplicationRecorder(PostgresApplicationRecorder):
    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events") -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        self.insert_plain_arrays_statement = SQL(
            "INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state) "
            "SELECT * FROM unnest(%b::{id_type}[], %b::bigint[], %b::text[], %b::bytea[]) "
            "RETURNING notification_id"
        ).format(schema=Identifier(self.datastore.schema), table=Identifier(self.events_table_name),
                 id_type=Identifier(self.datastore.originator_id_type))
        self._uuid_ids = self.datastore.originator_id_type == "uuid"

    def _insert_stored_events(self, curs: Any, stored_events: Sequence[StoredEvent], **kwargs: Any) -> None:
        self._lock_table(curs)
        self._notify_channel(curs)
        ids = [e.originator_id for e in stored_events]
        pg_arrays.register(curs.adapters)
        curs.execute(
            self.insert_plain_arrays_statement,
            (
                pg_arrays.uuid_array(ids) if self._uuid_ids else pg_arrays.text_array([str(i) for i in ids]),
                pg_arrays.int8_array([e.originator_version for e in stored_events]),
                pg_arrays.text_array([e.topic for e in stored_events]),
                pg_arrays.bytea_array([e.state for e in stored_events]),
            ),
            prepare=True,
        )

    def _fetch_ids_after_insert_events(self, curs: Any, stored_events: Sequence[StoredEvent],
                                       **kwargs: Any) -> Sequence[int] | None:
        """The library's read of the RETURNING rows (same checks), one tuple per row."""
        assert curs.statusmessage and curs.statusmessage.startswith("INSERT"), curs.statusmessage
        curs.row_factory = tuple_row
        ids = [row[0] for row in curs.fetchall()]
        if len(ids) != len(stored_events):
            msg = f"Couldn't get all notification IDs (got {len(ids)}, expected {len(stored_events)})"
            raise ProgrammingError(msg)
        return ids
