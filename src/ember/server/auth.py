"""Who may call the server: API keys (bearer), A1111-style HTTP Basic, origins, rate limits.

API keys are 32 random bytes shown once at creation; the database keeps only their SHA-256
(a key has 256 bits of entropy, so a fast hash is safe: there is nothing to brute-force).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from ember.errors import EmberError
from ember.server.jobs import JobStore

KEY_PREFIX = "ember_"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(store: JobStore, name: str) -> tuple[str, str]:
    """-> (key id, the secret key). Only the hash is stored."""
    if not name or len(name) > 100:
        raise EmberError("a key name must be 1 to 100 characters")
    key_id = secrets.token_hex(4)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    store.add_key(key_id, name, hash_key(secret))
    return key_id, secret


def parse_basic(spec: str | None) -> tuple[str, str] | None:
    """`--api-auth user:pass` (A1111's flag)."""
    if spec is None:
        return None
    user, sep, password = spec.partition(":")
    if not sep or not user or not password:
        raise EmberError("--api-auth must look like USER:PASSWORD")
    return user, password


@dataclass(frozen=True)
class AuthConfig:
    """`basic`: the --api-auth credentials. `required`: refuse anonymous callers even when no key
    exists (a non-loopback server must never fall open because its last key was revoked)."""

    basic: tuple[str, str] | None = None
    required: bool = False


def check_credentials(header: str | None, store: JobStore, config: AuthConfig) -> str | None:
    """The caller's identity ("key:<id>", "basic:<user>", "anonymous") or None if refused.

    Accepted: `Bearer <key>`; HTTP Basic with the --api-auth user and password (A1111 clients);
    HTTP Basic with any user name and an API key as the password (so a browser can log in).
    Without --api-auth and without any key, a loopback server lets everyone in.
    """
    if not header:
        if config.basic is None and not config.required and not store.has_keys():
            return "anonymous"
        return None
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer" and value:
        row = store.key_by_hash(hash_key(value))
        return f"key:{row['id']}" if row is not None else None
    if scheme == "basic" and value:
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        if config.basic is not None:
            ok_user = hmac.compare_digest(user.encode(), config.basic[0].encode())
            ok_pass = hmac.compare_digest(password.encode(), config.basic[1].encode())
            if ok_user and ok_pass:
                return f"basic:{user}"
        row = store.key_by_hash(hash_key(password)) if password else None
        return f"key:{row['id']}" if row is not None else None
    if config.basic is None and not config.required and not store.has_keys():
        return "anonymous"  # an open loopback server ignores stray headers
    return None


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Same-origin requests, or origins named by --cors-origin. `null` is never allowed."""
    if origin is None:
        return True  # not a browser cross-origin request (curl, client libraries)
    if origin == "null":
        return False
    if origin in allowed or "*" in allowed:
        return True
    if host is None:
        return False
    return origin in (f"http://{host}", f"https://{host}")


class RateLimiter:
    """Token bucket per identity: `rate` generation requests per minute, bursts up to `burst`.
    The buckets live in the store, so on a shared queue the limit holds across every worker."""

    def __init__(self, per_minute: float, burst: int | None, store: JobStore) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst if burst is not None else max(1, int(per_minute)))
        self.store = store

    def take(self, who: str) -> float:
        """0 if allowed, else seconds until a request would be."""
        if self.rate <= 0:
            return 0.0
        return self.store.take_token(who, self.rate, self.burst)


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")
