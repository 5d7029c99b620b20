"""API tokens: only a SHA-256 of each token is stored."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dispatch.store.models import ApiToken

ROLES = ("admin", "operator", "district", "community")


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    session: Session, role: str, name: str | None, district: str | None, now: datetime
) -> str:
    """Create a token and return it; it cannot be recovered later."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    token = "dsp_" + secrets.token_urlsafe(32)
    session.add(
        ApiToken(token_hash=_hash(token), role=role, name=name, district=district, created_at=now)
    )
    return token


def lookup_token(session: Session, token: str) -> dict[str, Any] | None:
    """The principal behind a token, or None if unknown or revoked."""
    row = session.scalar(
        select(ApiToken).where(ApiToken.token_hash == _hash(token), ApiToken.revoked_at.is_(None))
    )
    if row is None:
        return None
    return {"role": row.role, "name": row.name or f"{row.role}-{row.id}", "district": row.district}
