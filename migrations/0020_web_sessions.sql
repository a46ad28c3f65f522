-- Chaperone collector: status page login sessions.
--
-- Logging in to the status page with the API token creates a session: a random 256-bit id
-- whose SHA-256 is id_sha256 (the id itself is only in the browser's cookie, so a read of
-- this table does not give a usable session). token_sha256 is the SHA-256 of the API token
-- the session was opened with: once the token changes, the session is refused and deleted.
-- A session past expires_at is refused and deleted when it is presented; expired rows left
-- behind are deleted at the next login. Logging out deletes the row.

CREATE TABLE web_sessions (
    id_sha256    bytea       PRIMARY KEY CHECK (octet_length(id_sha256) = 32),
    token_sha256 bytea       NOT NULL CHECK (octet_length(token_sha256) = 32),
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL CHECK (expires_at > created_at)
);

CREATE INDEX web_sessions_expires ON web_sessions (expires_at);
