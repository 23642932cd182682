"""Conversations read model: the chat Jobs of an account grouped by the conversation id
they carry in their input (`input.conversation_id`, decision 0066), so the web app's
conversation list and history survive a reload and show up in another browser.

Two tables, both folded from `Job.Submitted` only (a Job's later state is read from
`proj_jobs` by job id when a conversation is shown):

- `proj_conversation_jobs`: one row per Job of a conversation, with its turn (how many
  user messages the Job's input holds, so a Regenerate of a turn has the same turn and the
  newest Job of a turn is the one shown) and the user's text of that turn (bounded).
- `proj_conversations`: one row per (account, conversation): title (the first user text,
  bounded), first and last activity, number of Jobs.

Rebuildable like every projection (`coordinator projections rebuild conversations`).
"""

from __future__ import annotations

from typing import Any

from eventsourcing.utils import get_topic

from projections.engine import Projection, Work
from projections.jobs import JOB_COLUMNS, job_row_to_dict
from projections.sql import INT, TEXT, Table
from scheduler.jobs import Job

TITLE_MAX_CHARS = 80
USER_TEXT_MAX_CHARS = 32_768  # the Cargo's own bound on one message (scheduler/validation.py)
MAX_LIST = 200
MAX_JOBS_SHOWN = 500

CONVERSATION_JOBS = Table(
    "proj_conversation_jobs",
    (("job_id", TEXT), ("account_id", TEXT), ("conversation_id", TEXT), ("turn", INT), ("user_text", TEXT),
     ("created_at_ms", INT), ("position", INT)),
    key=("job_id",),
    indexes=(("account_id", "conversation_id", "created_at_ms"),),
)

CONVERSATIONS = Table(
    "proj_conversations",
    (("account_id", TEXT), ("conversation_id", TEXT), ("title", TEXT), ("created_at_ms", INT),
     ("updated_at_ms", INT), ("jobs", INT), ("position", INT)),
    key=("account_id", "conversation_id"),
    indexes=(("account_id", "updated_at_ms"),),
)


def turn_of(inp: dict[str, Any]) -> tuple[int, str]:
    """(turn number from 1, the user's text of that turn) of a chat Job's input."""
    messages = [m for m in (inp.get("messages") or ()) if isinstance(m, dict)]
    users = [m for m in messages if m.get("role") == "user"]
    prompt = inp.get("prompt") or ""
    if prompt:
        return len(users) + 1, str(prompt)
    return max(1, len(users)), str(users[-1].get("content", "")) if users else ""


class ConversationsProjection(Projection):
    name = "conversations"
    version = 1
    tables = (CONVERSATION_JOBS, CONVERSATIONS)

    def handlers(self):
        return {get_topic(Job.Submitted): self.on_submitted}

    def on_submitted(self, w: Work, pos: int, oid: str, version: int, st: dict, ms: int) -> None:
        inp = st.get("input") or {}
        conv = inp.get("conversation_id") if isinstance(inp, dict) else None
        if not conv or st.get("parent_id") or st.get("kind") != "chat":
            return
        account = st["account_id"]
        turn, text = turn_of(inp)
        w["proj_conversation_jobs"].put(oid, {
            "job_id": oid, "account_id": account, "conversation_id": conv, "turn": turn,
            "user_text": text[:USER_TEXT_MAX_CHARS], "created_at_ms": ms, "position": pos})
        convs = w["proj_conversations"]
        key = (account, conv)
        row = convs.get(key)
        if row is None:
            title = " ".join(text.split())[:TITLE_MAX_CHARS] or "New conversation"
            convs.put(key, {"account_id": account, "conversation_id": conv, "title": title, "created_at_ms": ms,
                            "updated_at_ms": ms, "jobs": 1, "position": pos})
        else:
            row["updated_at_ms"] = ms
            row["jobs"] += 1
            row["position"] = pos
            convs.touch(key)


class ConversationsView:
    """Reads over the two tables (and `proj_jobs` for each Job's current state)."""

    def __init__(self, read_models: Any) -> None:
        self._rm = read_models

    def list_for_account(self, account_id: str, limit: int = 50) -> list[dict[str, Any]]:
        limit = max(1, min(limit, MAX_LIST))
        rows = self._rm._q("SELECT conversation_id, title, created_at_ms, updated_at_ms, jobs FROM proj_conversations "
                           "WHERE account_id = ? ORDER BY updated_at_ms DESC, conversation_id LIMIT ?",
                           (str(account_id), limit))
        return [dict(zip(("id", "title", "created_at_ms", "updated_at_ms", "jobs"), r)) for r in rows]

    def jobs(self, account_id: str, conversation_id: str) -> list[dict[str, Any]]:
        """Every Job of the conversation, oldest first, with its turn and user text; empty
        when the conversation is unknown or another account's."""
        cols = ", ".join(f"j.{c}" for c in JOB_COLUMNS)
        rows = self._rm._q(
            f"SELECT cj.turn, cj.user_text, {cols} FROM proj_conversation_jobs cj JOIN proj_jobs j "
            f"ON j.job_id = cj.job_id WHERE cj.account_id = ? AND cj.conversation_id = ? "
            f"ORDER BY cj.created_at_ms, cj.job_id LIMIT ?", (str(account_id), conversation_id, MAX_JOBS_SHOWN))
        out = []
        for r in rows:
            job = job_row_to_dict(r[2:])
            job["turn"], job["user_text"] = r[0], r[1]
            out.append(job)
        return out
