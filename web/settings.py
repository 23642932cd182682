"""The web app's settings, from the environment (docs/OPERATIONS.md, "Web app")."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from config.settings import SettingsError
from ledger.pricing import credits_to_micro

MAX_TOPUP_MICRO = 1_000 * 1_000_000


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value} is out of range {low}..{high}")
    return value


def _credits(env: Mapping[str, str], name: str, default: str) -> int:
    raw = (env.get(name) or default).strip()
    try:
        value = credits_to_micro(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r}: {exc}") from None
    if not 0 <= value <= MAX_TOPUP_MICRO:
        raise SettingsError(f"{name}={raw!r} must be 0..{MAX_TOPUP_MICRO // 1_000_000} credits")
    return value


def _secret(env: Mapping[str, str], data_dir: Path) -> str:
    """COORDINATOR_WEB_SECRET, or one made once and kept in the data dir (one machine)."""
    given = (env.get("COORDINATOR_WEB_SECRET") or "").strip()
    if given:
        if len(given) < 32:
            raise SettingsError("COORDINATOR_WEB_SECRET must be at least 32 characters")
        return given
    path = data_dir / "web_secret"
    try:
        text = path.read_text().strip()
        if len(text) >= 32:
            return text
    except OSError:
        pass
    text = secrets.token_hex(32)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o600)
        tmp.replace(path)
        return path.read_text().strip()
    except OSError:
        return text


@dataclass(frozen=True)
class WebSettings:
    enabled: bool
    public_url: str  # base of the login links the CLI prints
    secret: str  # CSRF token HMAC key
    secure_cookies: bool
    session_max_age_s: int
    login_link_ttl_s: int
    topup_micro: int  # the virtual top-up's amount per click; 0 = switched off
    topup_max_balance_micro: int  # a top-up is refused when it would take the balance above this

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, data_dir: Path | None = None,
                 host: str = "127.0.0.1", port: int = 8000) -> WebSettings:
        env = os.environ if env is None else env
        data_dir = data_dir or Path(env.get("COORDINATOR_DATA_DIR") or "./data")
        enabled = (env.get("COORDINATOR_WEB") or "on").strip().lower() not in ("0", "off", "false", "no")
        public = (env.get("COORDINATOR_PUBLIC_URL") or f"http://{host}:{port}").strip().rstrip("/")
        if not public.startswith(("http://", "https://")):
            raise SettingsError(f"COORDINATOR_PUBLIC_URL={public!r} must start with http:// or https://")
        secure_raw = (env.get("COORDINATOR_WEB_SECURE_COOKIES") or "").strip().lower()
        secure = public.startswith("https://") if not secure_raw else secure_raw in ("1", "true", "yes", "on")
        topup = _credits(env, "COORDINATOR_WEB_TOPUP_CREDITS", "10")
        cap = _credits(env, "COORDINATOR_WEB_TOPUP_MAX_BALANCE_CREDITS", "100")
        return cls(enabled=enabled, public_url=public, secret=_secret(env, data_dir), secure_cookies=secure,
                   session_max_age_s=_int(env, "COORDINATOR_WEB_SESSION_MAX_AGE_S", 7 * 86_400, 60, 90 * 86_400),
                   login_link_ttl_s=_int(env, "COORDINATOR_WEB_LOGIN_LINK_TTL_S", 900, 30, 86_400),
                   topup_micro=topup, topup_max_balance_micro=cap)
