"""Model text as Markdown without raw HTML: markdown-it-py's `js-default` preset (HTML
off, link targets validated: no `javascript:` / `data:` except images), so neither a
prompt nor an answer can inject markup or script; everything else is escaped text."""

from __future__ import annotations

from markdown_it import MarkdownIt

MAX_RENDER_CHARS = 256 * 1024

_md = MarkdownIt("js-default", {"html": False, "linkify": False, "typographer": False, "breaks": True})
_md.enable("table").enable("strikethrough")


def render(text: str | None) -> str:
    if not text:
        return ""
    return _md.render(text[:MAX_RENDER_CHARS])
