"""Read models: SQL tables fed from the event log with tracked positions (exactly once),
rebuildable and verifiable. See docs/PROJECTIONS.md.

- `projections.service.Projections`: one per process (runner + readers).
- `projections.reader.ReadModels`: every read the API and the CLI make.
- `projections.jobs.JobsView`: an account's Jobs, newest first.
- `projections.rebuild`: `rebuild(app, db, names)`, `verify(app, db, names)`.
"""
