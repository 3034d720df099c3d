"""Who is calling: API keys from the service database, or JWTs from an identity provider.

A caller is a `Principal`: a tenant, its access groups (the documents it may read), a subject
(whose chat sessions are whose) and whether it is an admin. Errors never echo the credential.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ragline.config import AuthSettings, JWTSettings
from ragline.serve.db import TOKEN_PREFIX, KeyRepository, parse_key_token
from ragline.store.base import DEFAULT_TENANT, Scope

_GROUP_SEPARATORS = re.compile(r"[\s,]+")
_CREDENTIALS_HELP = "send `Authorization: Bearer <API key or JWT>` or `X-API-Key: <API key>`"


@dataclass(frozen=True)
class Principal:
    tenant: str
    groups: frozenset[str] | None
    subject: str
    admin: bool
    via: Literal["key", "jwt", "none"]

    @property
    def scope(self) -> Scope:
        """What the caller may read: all of its tenant for an admin, else its groups (and EVERYONE)."""
        return Scope(self.tenant, None) if self.admin else Scope(self.tenant, self.groups)


ANONYMOUS = Principal(DEFAULT_TENANT, None, "anonymous", True, "none")


class AuthError(Exception):
    """401: no valid credential (the client should authenticate); 403: a valid one that grants nothing here."""

    def __init__(self, status: Literal[401, 403], code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        """RFC 6750's challenge on a 401."""
        if self.status != 401:
            return {}
        if self.code == "missing_credentials":
            return {"WWW-Authenticate": 'Bearer realm="ragline"'}
        return {"WWW-Authenticate": 'Bearer realm="ragline", error="invalid_token"'}


_JWT_ERRORS: list[tuple[type[jwt.InvalidTokenError], str, str]] = [
    (jwt.ExpiredSignatureError, "token_expired", "the token has expired: get a new one from the identity provider"),
    (jwt.ImmatureSignatureError, "token_not_yet_valid",
     "the token is not valid yet (nbf or iat in the future): check the clocks of the issuer and this server"),
    (jwt.InvalidAudienceError, "bad_audience", "the token's audience (aud) is not this service's"),
    (jwt.InvalidIssuerError, "bad_issuer", "the token's issuer (iss) is not the configured one"),
    (jwt.InvalidSignatureError, "bad_signature", "the token's signature does not verify: it was not signed by "
                                                 "the configured key"),
    (jwt.InvalidAlgorithmError, "bad_algorithm", "the token is signed with an algorithm this server does not accept"),
]


class JWTVerifier:
    """Checks a JWT's signature (HS256 secret, RS256 PEM key or JWKS by kid), exp, nbf, aud and iss, and reads
    the tenant, groups and admin flag from its claims."""

    def __init__(self, settings: JWTSettings) -> None:
        self._settings = settings
        self._key: Any = None
        self._jwks: dict[str, Any] = {}
        if settings.algorithm == "HS256":
            assert settings.secret is not None  # JWTSettings requires it
            self._key = settings.secret.get_secret_value()
        elif settings.public_key_file is not None:
            try:
                self._key = load_pem_public_key(settings.public_key_file.read_bytes())
            except (OSError, ValueError) as exc:
                raise ValueError(f"serve.auth.jwt.public_key_file {settings.public_key_file}: cannot read a PEM "
                                 f"public key ({exc})") from exc
            if not isinstance(self._key, RSAPublicKey):
                raise ValueError(f"serve.auth.jwt.public_key_file {settings.public_key_file}: RS256 needs an RSA "
                                 "public key")
        else:
            assert settings.jwks_file is not None  # JWTSettings requires one of the two
            try:
                key_set = jwt.PyJWKSet.from_json(settings.jwks_file.read_text())
            except (OSError, ValueError, jwt.PyJWTError) as exc:
                raise ValueError(f"serve.auth.jwt.jwks_file {settings.jwks_file}: not a usable JWKS ({exc})") from exc
            self._jwks = {key.key_id: key.key for key in key_set.keys if key.key_id}
            if not self._jwks:
                raise ValueError(f"serve.auth.jwt.jwks_file {settings.jwks_file}: no key has a kid")

    def _signing_key(self, token: str) -> Any:
        if not self._jwks:
            return self._key
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.DecodeError as exc:
            raise AuthError(401, "invalid_token", f"the bearer token is not a JWT ({exc})") from exc
        if kid is None and len(self._jwks) == 1:
            return next(iter(self._jwks.values()))
        if kid not in self._jwks:
            raise AuthError(401, "unknown_key", f"the token's key id (kid) {json.dumps(kid)} is not in the "
                                                "configured JWKS file: the server may need the provider's new keys")
        return self._jwks[kid]

    def verify(self, token: str) -> Principal:
        settings = self._settings
        try:
            claims = jwt.decode(
                token, self._signing_key(token), algorithms=[settings.algorithm], audience=settings.audience,
                issuer=settings.issuer, leeway=settings.leeway_s, options={"require": ["exp", "sub"]},
            )
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(401, "missing_claim", f"the token lacks the required claim {exc.claim!r}") from exc
        except jwt.InvalidTokenError as exc:
            for error_type, code, message in _JWT_ERRORS:
                if isinstance(exc, error_type):
                    raise AuthError(401, code, message) from exc
            raise AuthError(401, "invalid_token", f"the bearer token is not a valid JWT ({exc})") from exc
        tenant = claims.get(settings.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise AuthError(403, "missing_tenant", f"the token has no {settings.tenant_claim!r} claim naming the "
                            "tenant: have the identity provider add it, or set serve.auth.jwt.tenant_claim")
        return Principal(tenant, self._groups(claims.get(settings.groups_claim)), f"jwt:{claims['sub']}",
                         self._admin(claims), "jwt")

    def _groups(self, value: Any) -> frozenset[str]:
        if value is None:
            return frozenset()
        if isinstance(value, str):
            return frozenset(group for group in _GROUP_SEPARATORS.split(value) if group)
        if isinstance(value, list) and all(isinstance(group, str) for group in value):
            return frozenset(value)
        raise AuthError(403, "invalid_groups", f"the token's {self._settings.groups_claim!r} claim must be a list "
                                               "of strings or a space or comma separated string")

    def _admin(self, claims: dict[str, Any]) -> bool:
        if self._settings.admin_claim is None:
            return False
        value = claims.get(self._settings.admin_claim)
        return value is True or (isinstance(value, str) and value.lower() == "true")


class Authenticator:
    """Turns a request's `Authorization` / `X-API-Key` headers into a Principal, or raises AuthError."""

    def __init__(self, settings: AuthSettings, keys: KeyRepository) -> None:
        self._settings = settings
        self._keys = keys
        self._jwt = JWTVerifier(settings.jwt) if settings.jwt is not None else None

    async def authenticate(self, authorization: str | None, api_key: str | None) -> Principal:
        if not self._settings.enabled:
            return ANONYMOUS
        if authorization and api_key:
            raise AuthError(401, "ambiguous_credentials",
                            "send one credential: either the Authorization header or X-API-Key, not both")
        if api_key:
            return await self._key(api_key.strip(), "X-API-Key")
        if not authorization:
            raise AuthError(401, "missing_credentials", f"authentication required: {_CREDENTIALS_HELP} "
                            "(WWW-Authenticate: Bearer)")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError(401, "invalid_authorization", "the Authorization header must be `Bearer <token>`: "
                            + _CREDENTIALS_HELP)
        if token.startswith(TOKEN_PREFIX):
            return await self._key(token, "Authorization")
        if self._jwt is None:
            raise AuthError(401, "invalid_token", "the bearer token is not an API key (rl_...) and this server "
                            "accepts no JWTs (serve.auth.jwt is not set): use an API key")
        return self._jwt.verify(token)

    async def _key(self, token: str, header: str) -> Principal:
        if parse_key_token(token) is None:
            raise AuthError(401, "invalid_api_key", f"the API key in the {header} header is malformed: send the "
                            "whole token printed by `ragline keys create` (rl_<id>_<secret>)")
        key = await self._keys.verify(token)
        if key is None:
            raise AuthError(401, "invalid_api_key", f"the API key in the {header} header is unknown or revoked: "
                            "ask an admin for a new one (`ragline keys create`)")
        return Principal(key.tenant, frozenset(key.groups), f"key:{key.id}", key.admin, "key")
