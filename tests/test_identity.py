"""Callers' identities: JWTs (HS256, RS256 by PEM and by JWKS), API keys through the Authenticator, and the
`ragline keys` command line, on real databases."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ragline.cli import EXIT_RUN_FAILED, run
from ragline.config import AuthSettings, JWTSettings
from ragline.serve.db import Database
from ragline.serve.identity import AuthError, Authenticator, JWTVerifier, Principal
from ragline.store.base import Scope

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
AUDIENCE = "ragline"
ISSUER = "https://idp.example.org"


def hs256_settings(**overrides) -> JWTSettings:
    return JWTSettings(algorithm="HS256", secret=SECRET, audience=AUDIENCE, issuer=ISSUER, admin_claim="is_admin",
                       **overrides)


def claims(**overrides) -> dict:
    now = int(time.time())
    base = {"sub": "ann", "aud": AUDIENCE, "iss": ISSUER, "iat": now, "exp": now + 600, "tenant": "acme",
            "groups": ["eng", "ops"]}
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def refused(verifier: JWTVerifier, token: str) -> AuthError:
    with pytest.raises(AuthError) as failure:
        verifier.verify(token)
    assert token not in failure.value.message
    return failure.value


# --- HS256 -------------------------------------------------------------------------------------------------------


def test_hs256_token_gives_tenant_groups_and_subject():
    principal = JWTVerifier(hs256_settings()).verify(jwt.encode(claims(), SECRET, algorithm="HS256"))
    assert principal == Principal("acme", frozenset({"eng", "ops"}), "jwt:ann", False, "jwt")
    assert principal.scope == Scope("acme", frozenset({"eng", "ops"}))


def test_groups_as_a_string_and_the_admin_claim():
    verifier = JWTVerifier(hs256_settings())
    principal = verifier.verify(jwt.encode(claims(groups="eng ops,sales", is_admin=True), SECRET, algorithm="HS256"))
    assert principal.groups == frozenset({"eng", "ops", "sales"}) and principal.admin
    assert principal.scope == Scope("acme", None)
    no_groups = verifier.verify(jwt.encode(claims(groups=None), SECRET, algorithm="HS256"))
    assert no_groups.groups == frozenset() and not no_groups.admin
    assert refused(verifier, jwt.encode(claims(groups=7), SECRET, algorithm="HS256")).code == "invalid_groups"


def test_custom_claim_names():
    verifier = JWTVerifier(hs256_settings(tenant_claim="org", groups_claim="roles"))
    principal = verifier.verify(jwt.encode(claims(org="globex", roles=["r1"]), SECRET, algorithm="HS256"))
    assert (principal.tenant, principal.groups) == ("globex", frozenset({"r1"}))


@pytest.mark.parametrize(("overrides", "code", "status"), [
    ({"exp": int(time.time()) - 3600}, "token_expired", 401),
    ({"nbf": int(time.time()) + 3600}, "token_not_yet_valid", 401),
    ({"aud": "another-service"}, "bad_audience", 401),
    ({"iss": "https://evil.example.org"}, "bad_issuer", 401),
    ({"exp": None}, "missing_claim", 401),
    ({"sub": None}, "missing_claim", 401),
    ({"aud": None}, "missing_claim", 401),
    ({"tenant": None}, "missing_tenant", 403),
    ({"tenant": ""}, "missing_tenant", 403),
])
def test_hs256_refusals(overrides, code, status):
    error = refused(JWTVerifier(hs256_settings()), jwt.encode(claims(**overrides), SECRET, algorithm="HS256"))
    assert (error.code, error.status) == (code, status)
    assert (error.headers.get("WWW-Authenticate", "").startswith("Bearer")) == (status == 401)


def test_missing_tenant_message_names_the_claim():
    error = refused(JWTVerifier(hs256_settings()), jwt.encode(claims(tenant=None), SECRET, algorithm="HS256"))
    assert "'tenant' claim" in error.message and "tenant_claim" in error.message


def test_leeway_accepts_a_token_expired_a_moment_ago():
    token = jwt.encode(claims(exp=int(time.time()) - 5), SECRET, algorithm="HS256")
    assert JWTVerifier(hs256_settings(leeway_s=120)).verify(token).tenant == "acme"
    assert refused(JWTVerifier(hs256_settings(leeway_s=0)), token).code == "token_expired"


def test_hs256_bad_signature_and_garbage():
    verifier = JWTVerifier(hs256_settings())
    forged = jwt.encode(claims(), "another-secret-that-is-long-enough-too!!", algorithm="HS256")
    assert refused(verifier, forged).code == "bad_signature"
    assert refused(verifier, "not.a.jwt").code == "invalid_token"
    unsigned = jwt.encode(claims(), None, algorithm="none")
    assert refused(verifier, unsigned).code == "bad_algorithm"


def test_a_token_with_an_audience_is_refused_when_none_is_configured():
    verifier = JWTVerifier(JWTSettings(algorithm="HS256", secret=SECRET))
    assert refused(verifier, jwt.encode(claims(iss=None), SECRET, algorithm="HS256")).code == "bad_audience"
    assert verifier.verify(jwt.encode(claims(aud=None, iss=None), SECRET, algorithm="HS256")).tenant == "acme"


# --- RS256 -------------------------------------------------------------------------------------------------------


def base64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def write_pem(path: Path, key: rsa.RSAPrivateKey) -> Path:
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def test_rs256_with_a_pem_public_key(tmp_path: Path):
    key, stranger = rsa_key(), rsa_key()
    settings = JWTSettings(algorithm="RS256", public_key_file=write_pem(tmp_path / "idp.pem", key),
                           audience=AUDIENCE, issuer=ISSUER)
    verifier = JWTVerifier(settings)
    assert verifier.verify(jwt.encode(claims(), key, algorithm="RS256")).subject == "jwt:ann"
    assert refused(verifier, jwt.encode(claims(), stranger, algorithm="RS256")).code == "bad_signature"
    # algorithm confusion: an HS256 token whose HMAC secret is the (public) PEM key is refused
    signing_input = b".".join(
        base64url(json.dumps(part).encode()) for part in ({"alg": "HS256", "typ": "JWT"}, claims())
    )
    mac = hmac.new((tmp_path / "idp.pem").read_bytes(), signing_input, hashlib.sha256).digest()
    confused = f"{signing_input.decode()}.{base64url(mac).decode()}"
    assert refused(verifier, confused).code == "bad_algorithm"


def test_rs256_with_a_jwks_file_picks_the_key_by_kid(tmp_path: Path):
    first, second, stranger = rsa_key(), rsa_key(), rsa_key()
    keys = []
    for kid, key in (("k1", first), ("k2", second)):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": keys}))
    verifier = JWTVerifier(JWTSettings(algorithm="RS256", jwks_file=jwks, audience=AUDIENCE, issuer=ISSUER))

    assert verifier.verify(jwt.encode(claims(), second, algorithm="RS256", headers={"kid": "k2"})).tenant == "acme"
    assert verifier.verify(jwt.encode(claims(), first, algorithm="RS256", headers={"kid": "k1"})).tenant == "acme"
    wrong_key = jwt.encode(claims(), second, algorithm="RS256", headers={"kid": "k1"})
    assert refused(verifier, wrong_key).code == "bad_signature"
    unknown = refused(verifier, jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": "k9"}))
    assert unknown.code == "unknown_key" and '"k9"' in unknown.message
    assert refused(verifier, jwt.encode(claims(), first, algorithm="RS256")).code == "unknown_key"


def test_unusable_key_files_fail_at_startup(tmp_path: Path):
    (tmp_path / "broken.pem").write_text("not a key")
    with pytest.raises(ValueError, match="cannot read a PEM public key"):
        JWTVerifier(JWTSettings(algorithm="RS256", public_key_file=tmp_path / "broken.pem"))
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    with pytest.raises(ValueError, match="not a usable JWKS"):
        JWTVerifier(JWTSettings(algorithm="RS256", jwks_file=tmp_path / "jwks.json"))


# --- the Authenticator, with keys in a real database ---------------------------------------------------------


def authenticate(url: str, settings: AuthSettings, scenario):
    async def run_scenario():
        database = Database(url)
        try:
            await database.migrate()
            return await scenario(database, Authenticator(settings, database.keys))
        finally:
            await database.close()

    return asyncio.run(run_scenario())


def test_auth_disabled_is_the_default_tenants_anonymous_admin(tmp_path: Path):
    async def scenario(database, authenticator):
        principal = await authenticator.authenticate(None, None)
        assert principal == Principal("default", None, "anonymous", True, "none")
        assert principal.scope == Scope("default", None)

    authenticate(f"sqlite+aiosqlite:///{tmp_path / 's.sqlite'}", AuthSettings(enabled=False), scenario)


def test_api_keys_in_either_header(service_database_url):
    async def scenario(database, authenticator):
        key, token = await database.keys.create("acme", ["eng"])
        admin, admin_token = await database.keys.create("acme", ["eng"], admin=True)
        by_bearer = await authenticator.authenticate(f"Bearer {token}", None)
        assert by_bearer == Principal("acme", frozenset({"eng"}), f"key:{key.id}", False, "key")
        assert by_bearer.scope == Scope("acme", frozenset({"eng"}))
        assert await authenticator.authenticate(None, token) == by_bearer
        assert await authenticator.authenticate(f"bearer   {token} ", None) == by_bearer
        assert (await authenticator.authenticate(None, admin_token)).scope == Scope("acme", None)

        await database.keys.revoke(key.id)
        for authorization, api_key, header in ((f"Bearer {token}", None, "Authorization"), (None, token, "X-API-Key")):
            with pytest.raises(AuthError) as failure:
                await authenticator.authenticate(authorization, api_key)
            error = failure.value
            assert (error.status, error.code) == (401, "invalid_api_key")
            assert header in error.message and "unknown or revoked" in error.message and token not in error.message

    authenticate(service_database_url, AuthSettings(enabled=True), scenario)


async def auth_error(authenticator: Authenticator, authorization: str | None, api_key: str | None) -> AuthError:
    with pytest.raises(AuthError) as failure:
        await authenticator.authenticate(authorization, api_key)
    return failure.value


def test_missing_malformed_and_ambiguous_credentials(tmp_path: Path):
    async def scenario(database, authenticator):
        _, token = await database.keys.create("acme", [])
        missing = await auth_error(authenticator, None, None)
        assert (missing.status, missing.code) == (401, "missing_credentials")
        assert "WWW-Authenticate: Bearer" in missing.message
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        malformed = await auth_error(authenticator, None, "rl_short")
        assert malformed.code == "invalid_api_key" and "malformed" in malformed.message
        assert "X-API-Key" in malformed.message and "rl_short" not in malformed.message
        assert (await auth_error(authenticator, f"Basic {token}", None)).code == "invalid_authorization"
        assert (await auth_error(authenticator, "Bearer", None)).code == "invalid_authorization"
        assert (await auth_error(authenticator, f"Bearer {token}", token)).code == "ambiguous_credentials"
        no_jwt = await auth_error(authenticator, "Bearer eyJhbGciOi.x.y", None)
        assert no_jwt.code == "invalid_token" and "serve.auth.jwt" in no_jwt.message

    authenticate(f"sqlite+aiosqlite:///{tmp_path / 's.sqlite'}", AuthSettings(enabled=True), scenario)


def test_jwts_and_keys_side_by_side(tmp_path: Path):
    async def scenario(database, authenticator):
        _, token = await database.keys.create("globex", ["sales"])
        assert (await authenticator.authenticate(f"Bearer {token}", None)).via == "key"
        by_jwt = await authenticator.authenticate(f"Bearer {jwt.encode(claims(), SECRET, algorithm='HS256')}", None)
        assert by_jwt == Principal("acme", frozenset({"eng", "ops"}), "jwt:ann", False, "jwt")
        expired = jwt.encode(claims(exp=int(time.time()) - 3600), SECRET, algorithm="HS256")
        assert (await auth_error(authenticator, f"Bearer {expired}", None)).code == "token_expired"

    authenticate(f"sqlite+aiosqlite:///{tmp_path / 's.sqlite'}", AuthSettings(enabled=True, jwt=hs256_settings()),
                 scenario)


# --- `ragline keys` ----------------------------------------------------------------------------------------------


@pytest.fixture
def keys_cli_env(service_database_url, tmp_path: Path, monkeypatch) -> str:
    monkeypatch.setenv("RAGLINE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RAGLINE_SERVE__DATABASE_URL", service_database_url)
    monkeypatch.chdir(tmp_path)
    return service_database_url


def verify(url: str, token: str):
    async def scenario():
        database = Database(url)
        try:
            return await database.keys.verify(token)
        finally:
            await database.close()

    return asyncio.run(scenario())


def test_keys_cli_create_list_revoke(keys_cli_env, capsys):
    assert run(["keys", "create", "--tenant", "acme", "--groups", "eng, ops", "--name", "ci bot"]) == 0
    created = capsys.readouterr()
    tokens = re.findall(r"rl_[0-9a-f]{16}_[A-Za-z0-9_-]+", created.out)
    assert len(tokens) == 1 and created.out.strip() == tokens[0]
    assert "shown only once" in created.err
    token = tokens[0]
    key = verify(keys_cli_env, token)
    assert (key.tenant, key.groups, key.name, key.admin) == ("acme", ["eng", "ops"], "ci bot", False)
    secret = token.split("_", 2)[2]  # rl_<id>_<secret>; the secret itself may hold "_"

    assert run(["keys", "create", "--tenant", "globex", "--admin", "--json"]) == 0
    admin = json.loads(capsys.readouterr().out)
    assert admin["key"]["admin"] and admin["token"].startswith(f"rl_{admin['key']['id']}_")

    assert run(["keys", "list", "--tenant", "acme", "--json"]) == 0
    listed = capsys.readouterr().out
    assert [item["id"] for item in json.loads(listed)] == [key.id]
    assert secret not in listed and "token" not in listed
    assert run(["keys", "list"]) == 0
    table = capsys.readouterr().out
    assert key.id in table and admin["key"]["id"] in table and secret not in table

    assert run(["keys", "revoke", key.id]) == 0
    assert verify(keys_cli_env, token) is None
    assert verify(keys_cli_env, admin["token"]) is not None
    assert run(["keys", "revoke", key.id]) == EXIT_RUN_FAILED
    assert "no active API key" in capsys.readouterr().err


def test_keys_cli_reports_an_unreachable_database(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("RAGLINE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RAGLINE_SERVE__DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    monkeypatch.chdir(tmp_path)
    assert run(["keys", "list"]) == EXIT_RUN_FAILED
    error = capsys.readouterr().err
    assert "could not migrate the service database" in error and "Traceback" not in error
