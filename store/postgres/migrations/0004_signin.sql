-- Sign-in: the gateway's own signing keys and secret, OAuth apps, browser sessions, consents,
-- authorization codes, refresh tokens and the links of external identities to users: the same
-- tables and columns as the embedded store's migration 0004, in PostgreSQL types.
--
-- No token, code or client secret is ever stored: only its SHA-256 (sessions.hash,
-- auth_codes.hash, refresh_tokens.hash and successor, apps.secret_hash). The two exceptions are
-- signing_keys.private and server_secret.secret: they are the server's own keys, which it must
-- be able to use, not something a client presents; the database's access control protects them.

-- signing_keys are the Ed25519 keys the gateway signs its JWTs with. seq orders them: the last
-- added is the newest.
CREATE TABLE signing_keys (
    seq        BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kid        TEXT        NOT NULL UNIQUE,
    -- private is the 64-byte crypto/ed25519 private key, in the clear (see above).
    private    BYTEA       NOT NULL CHECK (length(private) = 64),
    created_at timestamptz NOT NULL
);

-- server_secret holds one row: the 32-byte HMAC secret, in the clear (see above).
CREATE TABLE server_secret (
    id         INTEGER     NOT NULL PRIMARY KEY CHECK (id = 1),
    secret     BYTEA       NOT NULL CHECK (length(secret) = 32),
    created_at timestamptz NOT NULL
);

-- apps are the registered OAuth clients. secret_hash is the SHA-256 of a confidential
-- client's secret, NULL for a public client. seq orders apps created at the same time.
CREATE TABLE apps (
    client_id     TEXT        NOT NULL PRIMARY KEY,
    name          TEXT        NOT NULL DEFAULT '',
    redirect_uris JSONB       NOT NULL DEFAULT 'null',
    first_party   BOOLEAN     NOT NULL DEFAULT false,
    scopes        JSONB       NOT NULL DEFAULT 'null',
    secret_hash   BYTEA       CHECK (secret_hash IS NULL OR length(secret_hash) = 32),
    created_at    timestamptz NOT NULL,
    seq           BIGINT      GENERATED ALWAYS AS IDENTITY
);

-- sessions are the signed-in browsers, by the SHA-256 of their cookie.
CREATE TABLE sessions (
    hash       BYTEA       NOT NULL PRIMARY KEY CHECK (length(hash) = 32),
    user_id    TEXT        NOT NULL REFERENCES users (id),
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);

CREATE INDEX sessions_by_user ON sessions (user_id);
CREATE INDEX sessions_by_expiry ON sessions (expires_at);

-- consents are what users allowed clients: an app's client_id, or "origin:" + a browser app's
-- origin. revoked_at is set when the user revoked it.
CREATE TABLE consents (
    user_id    TEXT        NOT NULL REFERENCES users (id),
    client     TEXT        NOT NULL,
    scopes     JSONB       NOT NULL DEFAULT 'null',
    created_at timestamptz NOT NULL,
    revoked_at timestamptz,
    PRIMARY KEY (user_id, client)
);

-- auth_codes are the authorization codes, by their SHA-256. used_at is set, once, when one is
-- redeemed: by the one UPDATE ... WHERE used_at IS NULL that gets it, on whichever instance.
CREATE TABLE auth_codes (
    hash         BYTEA       NOT NULL PRIMARY KEY CHECK (length(hash) = 32),
    client_id    TEXT        NOT NULL,
    user_id      TEXT        NOT NULL REFERENCES users (id),
    redirect_uri TEXT        NOT NULL DEFAULT '',
    scopes       JSONB       NOT NULL DEFAULT 'null',
    challenge    TEXT        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    used_at      timestamptz
);

CREATE INDEX auth_codes_by_expiry ON auth_codes (expires_at);

-- refresh_tokens are the refresh tokens, by their SHA-256. The tokens rotated from one another
-- share a family; a rotated one has rotated_at and the SHA-256 of its successor. origin is the
-- SHA-256 (hex) of the authorization code the family was issued from (NULL: none).
CREATE TABLE refresh_tokens (
    hash       BYTEA       NOT NULL PRIMARY KEY CHECK (length(hash) = 32),
    family     TEXT        NOT NULL,
    user_id    TEXT        NOT NULL REFERENCES users (id),
    client_id  TEXT        NOT NULL,
    scopes     JSONB       NOT NULL DEFAULT 'null',
    origin     TEXT,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    rotated_at timestamptz,
    successor  BYTEA       CHECK (successor IS NULL OR length(successor) = 32),
    revoked_at timestamptz,
    CHECK ((rotated_at IS NULL) = (successor IS NULL))
);

CREATE INDEX refresh_tokens_by_family ON refresh_tokens (family);
CREATE INDEX refresh_tokens_by_user_client ON refresh_tokens (user_id, client_id);
CREATE INDEX refresh_tokens_by_origin ON refresh_tokens (origin) WHERE origin IS NOT NULL;

-- external_subjects link a subject of an external identity provider (issuer) to a user.
CREATE TABLE external_subjects (
    issuer     TEXT        NOT NULL,
    subject    TEXT        NOT NULL,
    user_id    TEXT        NOT NULL REFERENCES users (id),
    created_at timestamptz NOT NULL,
    PRIMARY KEY (issuer, subject)
);

CREATE INDEX external_subjects_by_user ON external_subjects (user_id);
