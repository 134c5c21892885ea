-- Sign-in: the gateway's own signing keys and secret, OAuth apps, browser sessions, consents,
-- authorization codes, refresh tokens and the links of external identities to users.
--
-- No token, code or client secret is ever stored: only its SHA-256 (sessions.hash,
-- auth_codes.hash, refresh_tokens.hash and successor, apps.secret_hash). The two exceptions are
-- signing_keys.private and server_secret.secret: they are the server's own keys, which it must
-- be able to use, not something a client presents. They are protected by the file's
-- permissions (0600) like the rest of the database.

-- signing_keys are the Ed25519 keys the gateway signs its JWTs with. seq orders them: the last
-- added is the newest.
CREATE TABLE signing_keys (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    kid        TEXT    NOT NULL UNIQUE,
    -- private is the 64-byte crypto/ed25519 private key, in the clear (see above).
    private    BLOB    NOT NULL CHECK (length(private) = 64),
    created_at INTEGER NOT NULL
) STRICT;

-- server_secret holds one row: the 32-byte HMAC secret, in the clear (see above).
CREATE TABLE server_secret (
    id         INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    secret     BLOB    NOT NULL CHECK (length(secret) = 32),
    created_at INTEGER NOT NULL
) STRICT;

-- apps are the registered OAuth clients. secret_hash is the SHA-256 of a confidential
-- client's secret, NULL for a public client.
CREATE TABLE apps (
    client_id     TEXT    NOT NULL PRIMARY KEY,
    name          TEXT    NOT NULL DEFAULT '',
    redirect_uris TEXT    NOT NULL DEFAULT 'null' CHECK (json_valid(redirect_uris)),
    first_party   INTEGER NOT NULL DEFAULT 0 CHECK (first_party IN (0, 1)),
    scopes        TEXT    NOT NULL DEFAULT 'null' CHECK (json_valid(scopes)),
    secret_hash   BLOB    CHECK (secret_hash IS NULL OR length(secret_hash) = 32),
    created_at    INTEGER NOT NULL
) STRICT;

-- sessions are the signed-in browsers, by the SHA-256 of their cookie.
CREATE TABLE sessions (
    hash       BLOB    NOT NULL PRIMARY KEY CHECK (length(hash) = 32),
    user_id    TEXT    NOT NULL REFERENCES users (id),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE INDEX sessions_by_user ON sessions (user_id);

-- consents are what users allowed clients: an app's client_id, or "origin:" + a browser app's
-- origin. revoked_at is set when the user revoked it.
CREATE TABLE consents (
    user_id    TEXT    NOT NULL REFERENCES users (id),
    client     TEXT    NOT NULL,
    scopes     TEXT    NOT NULL DEFAULT 'null' CHECK (json_valid(scopes)),
    created_at INTEGER NOT NULL,
    revoked_at INTEGER,
    PRIMARY KEY (user_id, client)
) STRICT, WITHOUT ROWID;

-- auth_codes are the authorization codes, by their SHA-256. used_at is set, once, when one is
-- redeemed.
CREATE TABLE auth_codes (
    hash         BLOB    NOT NULL PRIMARY KEY CHECK (length(hash) = 32),
    client_id    TEXT    NOT NULL,
    user_id      TEXT    NOT NULL REFERENCES users (id),
    redirect_uri TEXT    NOT NULL DEFAULT '',
    scopes       TEXT    NOT NULL DEFAULT 'null' CHECK (json_valid(scopes)),
    challenge    TEXT    NOT NULL DEFAULT '',
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    used_at      INTEGER
) STRICT, WITHOUT ROWID;

-- refresh_tokens are the refresh tokens, by their SHA-256. The tokens rotated from one another
-- share a family; a rotated one has rotated_at and the SHA-256 of its successor. origin is the
-- SHA-256 (hex) of the authorization code the family was issued from (NULL: none).
CREATE TABLE refresh_tokens (
    hash       BLOB    NOT NULL PRIMARY KEY CHECK (length(hash) = 32),
    family     TEXT    NOT NULL,
    user_id    TEXT    NOT NULL REFERENCES users (id),
    client_id  TEXT    NOT NULL,
    scopes     TEXT    NOT NULL DEFAULT 'null' CHECK (json_valid(scopes)),
    origin     TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    rotated_at INTEGER,
    successor  BLOB    CHECK (successor IS NULL OR length(successor) = 32),
    revoked_at INTEGER,
    CHECK ((rotated_at IS NULL) = (successor IS NULL))
) STRICT, WITHOUT ROWID;

CREATE INDEX refresh_tokens_by_family ON refresh_tokens (family);
CREATE INDEX refresh_tokens_by_user_client ON refresh_tokens (user_id, client_id);
CREATE INDEX refresh_tokens_by_origin ON refresh_tokens (origin) WHERE origin IS NOT NULL;

-- external_subjects link a subject of an external identity provider (issuer) to a user.
CREATE TABLE external_subjects (
    issuer     TEXT    NOT NULL,
    subject    TEXT    NOT NULL,
    user_id    TEXT    NOT NULL REFERENCES users (id),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (issuer, subject)
) STRICT, WITHOUT ROWID;

CREATE INDEX external_subjects_by_user ON external_subjects (user_id);
