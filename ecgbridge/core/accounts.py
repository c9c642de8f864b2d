"""Who may use the console, and the append-only record of what they did.

Users have a role (``viewer`` < ``operator`` < ``admin``) and an argon2id password hash;
API tokens are random secrets stored only as their SHA-256, each with a role no higher
than its owner's. The audit log records every view of patient data and every action
(who, what, on what, when, from where); the store offers no way to change or delete an
audit row. These tables live in the message store's database and are created by
:meth:`~ecgbridge.core.store.MessageStore.create_schema` (new tables only: the existing
ones are unchanged).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import JSON, Boolean, DateTime, Integer, String, Text, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from ecgbridge.core.store import Base, MessageStore
from ecgbridge.errors import ConfigError

__all__ = ["Role", "UserRow", "ApiTokenRow", "AuditRow", "AccountStore", "Principal"]

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return {"viewer": 0, "operator": 1, "admin": 2}[self.value]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


def _now() -> datetime:
    return datetime.now(UTC)


class UserRow(Base):
    __tablename__ = "console_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(256))  # None: OIDC-only user
    role: Mapped[str] = mapped_column(String(16))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ApiTokenRow(Base):
    __tablename__ = "console_api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(64))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditRow(Base):
    """One thing a person (or a script with a token, or the system) did or looked at."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)
    actor: Mapped[str] = mapped_column(String(64), index=True)  # user name, "token:<name>" or "system"
    role: Mapped[str | None] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64), index=True)  # e.g. view_message, retry_delivery
    target: Mapped[str | None] = mapped_column(String(128), index=True)  # message id, destination, ...
    outcome: Mapped[str] = mapped_column(String(16), default="ok")  # ok | denied | failed
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    note: Mapped[str | None] = mapped_column(Text)


@dataclass(frozen=True)
class Principal:
    """Who is asking: a user (session) or an API token, with the role that applies."""

    name: str
    role: Role
    via: str = "session"  # session | token | oidc

    def allows(self, needed: Role) -> bool:
        return self.role.allows(needed)


class AccountStore:
    """Users, API tokens and the audit log, in the message store's database."""

    def __init__(self, store: MessageStore) -> None:
        self.store = store

    # ----- users -----------------------------------------------------------------
    def create_user(self, username: str, password: str | None, role: Role | str) -> UserRow:
        username = username.strip()
        if not username or len(username) > 64:
            raise ConfigError("a user name is 1 to 64 characters")
        if password is not None and len(password) < 12:
            raise ConfigError("a password has at least 12 characters")
        row = UserRow(
            username=username,
            role=Role(role).value,
            password_hash=_hasher.hash(password) if password is not None else None,
        )
        try:
            with self.store.session() as s, s.begin():
                s.add(row)
        except IntegrityError as exc:
            raise ConfigError(f"a user named {username!r} already exists") from exc
        return row

    def set_password(self, username: str, password: str) -> None:
        if len(password) < 12:
            raise ConfigError("a password has at least 12 characters")
        with self.store.session() as s, s.begin():
            row = s.scalar(select(UserRow).where(UserRow.username == username))
            if row is None:
                raise ConfigError(f"no user named {username!r}")
            row.password_hash = _hasher.hash(password)

    def set_role(self, username: str, role: Role | str, *, disabled: bool | None = None) -> None:
        with self.store.session() as s, s.begin():
            row = s.scalar(select(UserRow).where(UserRow.username == username))
            if row is None:
                raise ConfigError(f"no user named {username!r}")
            row.role = Role(role).value
            if disabled is not None:
                row.disabled = disabled

    def user(self, username: str) -> UserRow | None:
        with self.store.session() as s:
            return s.scalar(select(UserRow).where(UserRow.username == username))

    def users(self) -> list[UserRow]:
        with self.store.session() as s:
            return list(s.scalars(select(UserRow).order_by(UserRow.username)))

    def has_users(self) -> bool:
        with self.store.session() as s:
            return s.scalar(select(UserRow.id).limit(1)) is not None

    def authenticate(self, username: str, password: str) -> Principal | None:
        """The user's principal when the password is right and the user enabled; else None."""
        row = self.user(username)
        if row is None or row.disabled or not row.password_hash:
            _hasher.hash(password)  # the same work as a real check: no user-name oracle by timing
            return None
        try:
            _hasher.verify(row.password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if _hasher.check_needs_rehash(row.password_hash):
            self.set_password(username, password)
        return Principal(row.username, Role(row.role))

    # ----- API tokens ----------------------------------------------------------------
    def create_token(self, username: str, name: str, role: Role | str | None = None) -> str:
        """A new token for ``username`` (shown once); its role at most the user's."""
        owner = self.user(username)
        if owner is None:
            raise ConfigError(f"no user named {username!r}")
        wanted = Role(role) if role is not None else Role(owner.role)
        if not Role(owner.role).allows(wanted):
            raise ConfigError(f"a token cannot have more rights ({wanted}) than its user ({owner.role})")
        secret = "ecgb_" + secrets.token_urlsafe(32)
        with self.store.session() as s, s.begin():
            s.add(ApiTokenRow(username=username, name=name[:64], token_sha256=_sha(secret), role=wanted.value))
        return secret

    def token_principal(self, secret: str) -> Principal | None:
        with self.store.session() as s, s.begin():
            row = s.scalar(select(ApiTokenRow).where(ApiTokenRow.token_sha256 == _sha(secret)))
            if row is None or row.revoked:
                return None
            owner = s.scalar(select(UserRow).where(UserRow.username == row.username))
            if owner is None or owner.disabled:
                return None
            row.last_used_at = _now()
            # a token never has more rights than its user has now
            role = min(Role(row.role), Role(owner.role), key=lambda r: r.rank)
            return Principal(f"token:{row.name}@{row.username}", role, via="token")

    def revoke_token(self, name: str, username: str) -> bool:
        with self.store.session() as s, s.begin():
            rows = list(
                s.scalars(select(ApiTokenRow).where(ApiTokenRow.name == name, ApiTokenRow.username == username))
            )
            for row in rows:
                row.revoked = True
            return bool(rows)

    # ----- audit ------------------------------------------------------------------------
    def audit(
        self,
        actor: str,
        action: str,
        *,
        target: str | None = None,
        role: str | None = None,
        outcome: str = "ok",
        remote_addr: str | None = None,
        detail: dict[str, Any] | None = None,
        note: str | None = None,
    ) -> None:
        with self.store.session() as s, s.begin():
            s.add(
                AuditRow(
                    actor=actor[:64],
                    role=role,
                    action=action[:64],
                    target=(target or None) and target[:128],
                    outcome=outcome,
                    remote_addr=remote_addr,
                    detail=dict(detail or {}),
                    note=note,
                )
            )

    def audit_log(
        self,
        *,
        limit: int = 100,
        before_id: int | None = None,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
    ) -> list[AuditRow]:
        with self.store.session() as s:
            q = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
            if before_id is not None:
                q = q.where(AuditRow.id < before_id)
            if actor:
                q = q.where(AuditRow.actor == actor)
            if action:
                q = q.where(AuditRow.action == action)
            if target:
                q = q.where(AuditRow.target == target)
            return list(s.scalars(q))


def _sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
