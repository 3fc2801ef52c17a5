"""Tenants and API keys. Keys are random (256 bits) and stored only as their SHA-256."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.tables import ApiKey, Tenant, new_id, utcnow

KEY_PREFIX = "vitq_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    key_id: str
    key: str
    tenant_id: str
    tenant_name: str
    webhook_secret: str


def get_or_create_tenant(session: Session, *, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        tenant = Tenant(id=new_id("ten"), name=name, webhook_secret=secret)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, *, tenant_name: str) -> NewKey:
    if not tenant_name or len(tenant_name) > 200:
        raise ValueError("tenant name must be 1-200 characters")
    tenant = get_or_create_tenant(session, name=tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:12])
    session.add(row)
    session.flush()
    return NewKey(row.id, key, tenant.id, tenant.name, tenant.webhook_secret)


def authenticate(session: Session, *, key: str) -> Tenant | None:
    """The live key's tenant, in one query. The lookup is by SHA-256 of the key, so how long it takes
    says nothing about how much of a guessed key was right; the digests are compared once more with
    ``hmac.compare_digest`` so no code path compares secrets byte by byte."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    digest = hash_key(key)
    found = session.execute(
        select(Tenant, ApiKey.key_hash)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
    ).first()
    if found is None or not hmac.compare_digest(found[1], digest):
        return None
    return found[0]


def revoke_key(session: Session, *, key_or_id: str) -> bool:
    """Revoke by key id (``key_…``) or by the key itself. Returns whether a live key was revoked."""
    if key_or_id.startswith(KEY_PREFIX):
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key_or_id)))
    else:
        row = session.get(ApiKey, key_or_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    return True
