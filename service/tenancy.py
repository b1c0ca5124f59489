"""Tenants: who may use the service, and how much of it.

A tenant is a name, the API keys that authenticate as it, and its limits (all optional:
absent means unlimited). Keys come from ``--api-key`` (one tenant, ``default``, no limits)
or a TOML file (``--tenants``)::

    [tenants.alice]
    keys = ["sk-alice-1"]          # or sha256 digests of keys: "sha256:<hex>"
    max_sessions = 8               # open sessions
    max_queued_calls = 64          # calls waiting or running (an OpenAI request is one)
    max_prompt_tokens = 8192       # per call
    max_tokens = 1024              # per call
    tokens_per_minute = 200000     # prompt + output, rolling 60 s

Only sha256 digests of keys are kept; a presented key is hashed and compared with every
known digest by ``hmac.compare_digest``, so neither the comparison nor which tenant it
matched shows in the timing. Keys are never logged. With no keys configured, every
request is tenant ``default`` without limits (the service is open, as before).

Operator credentials (``--admin-key``, ``--cluster-secret``) are kept apart from tenant
keys: they guard the engine routes and are not tenant keys (see ``service.api.auth``).
"""

from __future__ import annotations

import hashlib
import hmac
import time
import weakref
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from parrot.service.config_files import first_error, read_toml
from parrot.service.errors import RateLimitError

DEFAULT_TENANT = "default"
WINDOW_S = 60.0
_DIGEST_PREFIX = "sha256:"


class TenantsFileError(ValueError):
    """A tenants file that cannot be used; the message is one line."""


class TenantConfig(BaseModel):
    """One tenant's keys and limits; ``None`` is unlimited."""

    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(default_factory=list)
    max_sessions: int | None = Field(None, ge=0)
    max_queued_calls: int | None = Field(None, ge=0)
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)

    @field_validator("keys")
    @classmethod
    def _keys_usable(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not key:
                raise ValueError("a key must not be empty")
            if key.startswith(_DIGEST_PREFIX):
                hexpart = key.removeprefix(_DIGEST_PREFIX)
                if len(hexpart) != 64 or any(c not in "0123456789abcdefABCDEF" for c in hexpart):
                    raise ValueError("a sha256: key must be followed by 64 hex digits")
        return keys


def key_digest(key: str) -> bytes:
    """The sha256 digest of a key (a ``sha256:<hex>`` entry is already one)."""
    if key.startswith(_DIGEST_PREFIX):
        return bytes.fromhex(key.removeprefix(_DIGEST_PREFIX))
    return hashlib.sha256(key.encode()).digest()


def match_digest(key: str, digests: Iterable[tuple[bytes, str]]) -> str | None:
    """The label of the digest ``key`` hashes to, or None; compares with every digest, in
    constant time each, whether or not an earlier one matched."""
    presented = hashlib.sha256(key.encode()).digest()
    found: str | None = None
    for digest, label in digests:
        if hmac.compare_digest(presented, digest) and found is None:
            found = label
    return found


class _Terminable(Protocol):
    @property
    def is_terminal(self) -> bool: ...


class Tenant:
    """A tenant's limits and live counters: calls in flight and a rolling token window."""

    def __init__(self, name: str, config: TenantConfig | None = None) -> None:
        self.name = name
        self.config = config or TenantConfig()
        self.open_sessions = 0
        self.requests_running = 0  # OpenAI requests in flight (each counts as one call)
        # Native LLM calls submitted and not yet seen terminal; weak, so a deleted session's
        # calls are not kept alive here.
        self._calls: weakref.WeakSet[_Terminable] = weakref.WeakSet()
        self._window: deque[tuple[float, int]] = deque()  # (time, tokens) charged
        self._window_total = 0

    def __repr__(self) -> str:
        return f"Tenant({self.name!r})"

    # ---- counters -------------------------------------------------------------------
    def active_calls(self) -> int:
        """Calls pending or running: native LLM calls not yet terminal, plus OpenAI requests."""
        for call in [c for c in self._calls if c.is_terminal]:
            self._calls.discard(call)
        return len(self._calls) + self.requests_running

    def tokens_last_minute(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        while self._window and self._window[0][0] <= now - WINDOW_S:
            self._window_total -= self._window.popleft()[1]
        return self._window_total

    def charge(self, tokens: int) -> None:
        """Count a finished request's prompt + output tokens in the rolling window."""
        if tokens > 0:
            self._window.append((time.monotonic(), tokens))
            self._window_total += tokens

    # ---- checks (each raises RateLimitError naming the limit) -------------------------
    def check_session(self) -> None:
        limit = self.config.max_sessions
        if limit is not None and self.open_sessions >= limit:
            raise RateLimitError(f"max_sessions: tenant {self.name!r} has {self.open_sessions} open "
                                 f"sessions, the limit is {limit}; delete one first",
                                 retry_after_s=1.0)
        self.check_rate()

    def check_rate(self) -> None:
        """Refuse new work while the last 60 s used ``tokens_per_minute`` or more."""
        limit = self.config.tokens_per_minute
        if limit is None:
            return
        now = time.monotonic()
        used = self.tokens_last_minute(now)
        if used < limit:
            return
        # Wait until enough of the oldest charges leave the window.
        left, retry = used, 1.0
        for at, tokens in self._window:
            left -= tokens
            if left < limit:
                retry = at + WINDOW_S - now
                break
        raise RateLimitError(f"tokens_per_minute: tenant {self.name!r} used {used} tokens in the "
                             f"last minute, the limit is {limit}", retry_after_s=retry)

    def check_calls(self, new: int) -> None:
        """Admit ``new`` more calls, or refuse them all (max_queued_calls, tokens_per_minute)."""
        self.check_rate()
        limit = self.config.max_queued_calls
        if limit is None or new == 0:
            return
        active = self.active_calls()
        if active + new > limit:
            raise RateLimitError(f"max_queued_calls: tenant {self.name!r} has {active} calls pending "
                                 f"or running, {new} more would exceed the limit of {limit}",
                                 retry_after_s=1.0)

    def check_max_tokens(self, max_tokens: int, param: str = "max_tokens") -> None:
        limit = self.config.max_tokens
        if limit is not None and max_tokens > limit:
            raise RateLimitError(f"max_tokens: a call may generate at most {limit} tokens for tenant "
                                 f"{self.name!r}, {max_tokens} were asked for", param=param,
                                 retry_after_s=1.0)

    def check_prompt(self, prompt_tokens: int, param: str | None = None) -> None:
        limit = self.config.max_prompt_tokens
        if limit is not None and prompt_tokens > limit:
            raise RateLimitError(f"max_prompt_tokens: a prompt may have at most {limit} tokens for "
                                 f"tenant {self.name!r}, this one has {prompt_tokens}", param=param,
                                 retry_after_s=1.0)

    def calls_submitted(self, calls: Iterable[_Terminable]) -> None:
        """Count these native calls against max_queued_calls until each is terminal."""
        self._calls.update(calls)


class Tenants:
    """The configured tenants and operator credentials; authenticates keys."""

    def __init__(self, configs: dict[str, TenantConfig] | None = None, *,
                 admin_keys: Iterable[str] = ()) -> None:
        configs = configs or {}
        self.by_name = {name: Tenant(name, cfg) for name, cfg in configs.items()}
        self._digests = [(key_digest(k), name) for name, cfg in configs.items() for k in cfg.keys]
        self._admin = [(key_digest(k), "admin") for k in admin_keys if k]
        self.default = self.by_name.get(DEFAULT_TENANT) or Tenant(DEFAULT_TENANT)

    @classmethod
    def single_key(cls, api_key: str, *, admin_keys: Iterable[str] = ()) -> Tenants:
        """``--api-key``: one tenant, ``default``, with that key and no limits."""
        return cls({DEFAULT_TENANT: TenantConfig(keys=[api_key])}, admin_keys=admin_keys)

    @property
    def keys_required(self) -> bool:
        """Whether tenant routes need a key (any tenant key configured)."""
        return bool(self._digests)

    @property
    def operator_required(self) -> bool:
        """Whether the engine routes are guarded (any key, tenant or operator, configured)."""
        return bool(self._digests or self._admin)

    @property
    def has_operator(self) -> bool:
        """Whether an admin key or cluster secret is configured."""
        return bool(self._admin)

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant this key belongs to; None for a missing or unknown key."""
        if not key:
            return None
        name = match_digest(key, self._digests)
        return None if name is None else self.by_name[name]

    def is_operator(self, key: str | None) -> bool:
        return bool(key) and match_digest(key or "", self._admin) is not None


def load_tenants(path: str | Path) -> dict[str, TenantConfig]:
    """Read a tenants TOML file (``[tenants.<name>]`` tables); errors are one line."""
    data = read_toml(path, "tenants file", TenantsFileError)
    unknown = sorted(set(data) - {"tenants"})
    if unknown:
        raise TenantsFileError(f"{path}: unknown table {unknown[0]!r}; expected [tenants.<name>]")
    tables = data.get("tenants")
    if not isinstance(tables, dict) or not tables:
        raise TenantsFileError(f"{path}: no tenants; add a [tenants.<name>] table with keys")
    configs: dict[str, TenantConfig] = {}
    owner: dict[bytes, str] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise TenantsFileError(f"{path}: tenants.{name} must be a table")
        try:
            cfg = TenantConfig.model_validate(table)
        except ValidationError as exc:
            field, message, err = first_error(exc)
            what = "unknown field" if err["type"] == "extra_forbidden" else message
            raise TenantsFileError(f"{path}: tenants.{name}.{field}: {what}") from None
        if not cfg.keys:
            raise TenantsFileError(f"{path}: tenants.{name} has no keys")
        for key in cfg.keys:
            digest = key_digest(key)
            if digest in owner:  # the key itself is never printed
                raise TenantsFileError(f"{path}: tenants {owner[digest]!r} and {name!r} share a key")
            owner[digest] = name
        configs[name] = cfg
    return configs

