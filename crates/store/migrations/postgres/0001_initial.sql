-- spacegate's control plane on PostgreSQL. Append-only: a shipped migration is never
-- edited (sqlx records its checksum), a change is a new file.
CREATE TABLE environments (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
CREATE TABLE access_tokens (
    id             TEXT PRIMARY KEY,
    environment_id TEXT NOT NULL REFERENCES environments(id),
    name           TEXT,
    permissions    TEXT NOT NULL,
    secret_sha256  BYTEA NOT NULL CHECK (octet_length(secret_sha256) = 32),
    created_at     BIGINT NOT NULL
);
CREATE TABLE signing_keys (
    seq            BIGSERIAL PRIMARY KEY,
    id             TEXT NOT NULL UNIQUE,
    environment_id TEXT NOT NULL REFERENCES environments(id),
    public_key     BYTEA NOT NULL,
    created_at     BIGINT NOT NULL
);
CREATE INDEX signing_keys_by_env ON signing_keys(environment_id, seq);
CREATE TABLE spaces (
    seq               BIGSERIAL PRIMARY KEY,
    id                TEXT NOT NULL UNIQUE,
    environment_id    TEXT NOT NULL REFERENCES environments(id),
    passthrough       TEXT,
    status            TEXT NOT NULL CHECK (status IN ('idle', 'active')),
    active_session_id TEXT,
    created_at        BIGINT NOT NULL
);
CREATE INDEX spaces_by_env ON spaces(environment_id, seq);
-- The status writer's batches touch only active spaces going idle and idle ones going
-- active; `mark_all_spaces_idle` scans only the active ones.
CREATE INDEX spaces_active ON spaces(id) WHERE status = 'active';
