//! The PostgreSQL engine: a [`Store`] that several broker replicas share (`[store] engine =
//! "postgres"`). Every serialisation point lives in the database, so nothing here assumes one
//! process:
//!
//! - a unit of work is one transaction on one pooled connection (READ COMMITTED), its commit the
//!   durability point (with synchronous replication, on the standby too); a unit dropped without
//!   commit is rolled back;
//! - identity and task locks are row locks (`FOR UPDATE`); `try_lock_task` and the claims of due
//!   entries use `SKIP LOCKED`; revocation claims are a `claimed_until` column, so they outlive
//!   the unit that took them;
//! - idempotency keys are unique constraints; approvals are used once under their row lock; key
//!   material is created once by `INSERT … ON CONFLICT DO NOTHING` and replaced by a conditional
//!   `UPDATE`;
//! - the kill switch is a column read under the identity's row lock (and by every caller check);
//! - the audit chain's head is one row, locked by a committing unit as its last step, so the
//!   chain has no gap (a rolled-back unit appends nothing) and no fork (one holder of the row);
//! - leases are rows with a holder, an epoch and a validity; a fenced unit holds its lease row
//!   with `FOR SHARE`, so a takeover waits for it to end.
//!
//! Reads outside a unit of work use a second pool, so a unit waiting for a read can never hold
//! every connection a read needs. A database that cannot be reached, that is shutting down, or
//! that is a read-only standby makes calls fail `UNAVAILABLE`, and the connection is dropped: the
//! next call connects again (with a multi-host connection string and
//! `target_session_attrs=read-write`, to whichever host is the primary now).
//!
//! Records are stored as the same JSON as in sled, with the columns the engine must see beside
//! them. Sealing stays above the engine: the database sees ciphertext and keyed hashes only.
//! The schema is created and migrated by the broker itself ([`MIGRATIONS`]), under an advisory
//! lock so that replicas starting together migrate once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use super::{
    Change, Counts, Expiring, Fut, IdentityRow, Inserted, Lease, SealedSecret, Store, Uow,
};
use crate::audit::{Anchor, Event, Head};
use crate::error::{Error, Result};
use crate::model::{
    Approval, ApprovalId, ApprovalState, CredentialId, CredentialRecord, CredentialState, Grant,
    Revocation, SpiffeId, Task, TaskId, TaskState, UnixMillis, UpstreamObject,
};

/// How long a call waits for a free connection before it fails `UNAVAILABLE`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Advisory lock key of the migrations ("jitbroker" in ASCII, truncated to 8 bytes).
const MIGRATION_LOCK: i64 = 0x6a69_7462_726f_6b65;

/// The schema, one entry per version; applied in order, each once, in one transaction each.
/// Text keys use the "C" collation so listings come back in byte order, as sled's do.
pub const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE tasks (
    id text COLLATE "C" PRIMARY KEY,
    owner text COLLATE "C" NOT NULL,
    active boolean NOT NULL,
    parent text COLLATE "C",
    idem_key text COLLATE "C",
    record bytea NOT NULL,
    UNIQUE (owner, idem_key)
);
CREATE INDEX tasks_live_by_owner ON tasks (owner, id) WHERE active;
CREATE INDEX tasks_by_parent ON tasks (parent, id) WHERE parent IS NOT NULL;
CREATE TABLE credentials (
    id text COLLATE "C" PRIMARY KEY,
    task_id text COLLATE "C" NOT NULL,
    idem_key text COLLATE "C",
    secret_hash bytea UNIQUE,
    sealed bytea,
    record bytea NOT NULL,
    UNIQUE (task_id, idem_key)
);
CREATE INDEX credentials_by_task ON credentials (task_id, id);
CREATE TABLE due (
    at bigint NOT NULL,
    kind text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    PRIMARY KEY (at, kind, id)
);
CREATE INDEX due_by_id ON due (id);
CREATE TABLE approvals (
    id text COLLATE "C" PRIMARY KEY,
    task_id text COLLATE "C" NOT NULL,
    record bytea NOT NULL
);
CREATE INDEX approvals_by_task ON approvals (task_id);
CREATE TABLE approval_grants (
    task_id text COLLATE "C" NOT NULL,
    resource text COLLATE "C" NOT NULL,
    action text COLLATE "C" NOT NULL,
    approval_id text COLLATE "C" NOT NULL,
    PRIMARY KEY (task_id, resource, action)
);
CREATE TABLE identities (
    spiffe_id text COLLATE "C" PRIMARY KEY,
    blocked boolean NOT NULL DEFAULT false
);
CREATE INDEX identities_blocked ON identities (spiffe_id) WHERE blocked;
CREATE TABLE upstream (
    resource text COLLATE "C" NOT NULL,
    name text COLLATE "C" NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (resource, name)
);
CREATE TABLE revocations (
    resource text COLLATE "C" NOT NULL,
    name text COLLATE "C" NOT NULL,
    next_attempt_at bigint NOT NULL,
    claimed_until bigint NOT NULL DEFAULT 0,
    record bytea NOT NULL,
    PRIMARY KEY (resource, name)
);
CREATE TABLE meta (
    key text COLLATE "C" PRIMARY KEY,
    value bytea NOT NULL
);
CREATE TABLE leases (
    name text COLLATE "C" PRIMARY KEY,
    holder text NOT NULL,
    epoch bigint NOT NULL,
    valid_until bigint NOT NULL
);
CREATE TABLE audit (
    seq bigint PRIMARY KEY,
    entry bytea NOT NULL
);
CREATE TABLE audit_head (
    id smallint PRIMARY KEY CHECK (id = 1),
    next bigint NOT NULL,
    prev bytea NOT NULL
);
INSERT INTO audit_head (id, next, prev) VALUES (1, 1, '\x0000000000000000000000000000000000000000000000000000000000000000');
"#];

/// Connection settings of the engine.
pub struct PgSettings {
    /// The connection string (libpq `key=value` form or a `postgresql://` URL).
    pub dsn: zeroize::Zeroizing<String>,
    /// Verified TLS with these CA certificates; `None` only for loopback servers.
    pub tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// Connections in each of the two pools (units of work, reads).
    pub pool_size: usize,
}

impl PgSettings {
    /// Reads the connection string from `dsn_file` and checks it: verified TLS with `ca_file`,
    /// or every host on loopback. `section` names the configuration section in errors.
    pub fn from_files(
        section: &str,
        dsn_file: &std::path::Path,
        ca_file: Option<&std::path::Path>,
        pool_size: usize,
    ) -> Result<Self> {
        let raw = zeroize::Zeroizing::new(std::fs::read_to_string(dsn_file).map_err(|e| {
            Error::Config(format!("{section} dsn_file {}: {e}", dsn_file.display()))
        })?);
        let dsn = zeroize::Zeroizing::new(raw.trim().to_owned());
        let parsed: tokio_postgres::Config = dsn.parse().map_err(|e| {
            Error::Config(format!(
                "{section} dsn_file {}: not a PostgreSQL connection string: {e}",
                dsn_file.display()
            ))
        })?;
        let tls = match ca_file {
            Some(ca) => Some(crate::issuers::postgres::tls_connector(section, ca)?),
            None if crate::issuers::postgres::only_loopback(&parsed) => None,
            None => {
                return Err(Error::Config(format!(
                    "{section} the database is not on loopback: set ca_file (the CA of the \
                     server's certificate) so that the connection uses verified TLS"
                )));
            }
        };
        if pool_size == 0 {
            return Err(Error::Config(format!(
                "{section} pool_size must be at least 1"
            )));
        }
        Ok(Self {
            dsn,
            tls,
            pool_size,
        })
    }
}

/// Whether an error means "the database is not there now" (retry later, elsewhere) rather than
/// a fault in what was asked.
fn transient(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        None => true,
        Some(d) => {
            let c = d.code().code();
            c.starts_with("08") // connection exception
                || c.starts_with("57P") // admin/crash shutdown, cannot connect now
                || c.starts_with("53") // insufficient resources
                || c == "25006" // read-only transaction: a standby, or a demoted primary
                || c == "40001" // serialization failure
                || c == "40P01" // deadlock detected
                || c == "55P03" // lock not available
        }
    }
}

fn db_err(what: &str, e: &tokio_postgres::Error) -> Error {
    let msg = format!(
        "{}: {}",
        crate::issuers::postgres::pg_err(e),
        crate::issuers::postgres::source_chain(e)
    );
    if transient(e) {
        Error::Unavailable(format!("the database is unavailable ({what}): {msg}"))
    } else {
        Error::Storage(format!("database error ({what}): {msg}"))
    }
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(Error::internal)
}

fn dec<T: DeserializeOwned>(what: &str, b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| Error::Storage(format!("corrupt {what} record: {e}")))
}

fn col<'r, T: tokio_postgres::types::FromSql<'r>>(row: &'r Row, i: usize) -> Result<T> {
    row.try_get(i)
        .map_err(|e| Error::Storage(format!("unexpected column {i} in a database row: {e}")))
}

fn due_kind(what: &Expiring) -> (&'static str, &str) {
    match what {
        Expiring::Task(id) => ("t", id.as_str()),
        Expiring::Credential(id) => ("c", id.as_str()),
        Expiring::Purge(id) => ("p", id.as_str()),
    }
}

fn parse_due(kind: &str, id: &str) -> Result<Expiring> {
    Ok(match kind {
        "t" => Expiring::Task(TaskId::parse(id)?),
        "c" => Expiring::Credential(CredentialId::parse(id)?),
        "p" => Expiring::Purge(TaskId::parse(id)?),
        other => return Err(Error::Storage(format!("unknown expiry kind {other:?}"))),
    })
}

fn spiffe(s: &str) -> Result<SpiffeId> {
    SpiffeId::parse("stored identity", s)
        .map_err(|e| Error::Storage(format!("corrupt identity in the database: {e}")))
}

fn as_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::Storage(format!("negative {what} in the database")))
}

fn as_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(what, "is too large"))
}

fn limit_of(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One database session with its prepared statements.
struct Session {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

/// A pool of sessions bounded by a semaphore.
struct Pool {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    idle: Mutex<Vec<Session>>,
    permits: Arc<Semaphore>,
    size: usize,
    name: &'static str,
}

impl Pool {
    async fn connect(&self) -> Result<Session> {
        let ended = |e: tokio_postgres::Error| {
            tracing::debug!(error = %e, "database session ended");
        };
        let client = match &self.tls {
            Some(tls) => {
                let (client, conn) = self
                    .config
                    .connect(tls.clone())
                    .await
                    .map_err(|e| db_err("connect", &e))?;
                tokio::spawn(async move { conn.await.unwrap_or_else(ended) });
                client
            }
            None => {
                let (client, conn) = self
                    .config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| db_err("connect", &e))?;
                tokio::spawn(async move { conn.await.unwrap_or_else(ended) });
                client
            }
        };
        Ok(Session {
            client,
            statements: HashMap::new(),
        })
    }

    async fn get(self: &Arc<Self>) -> Result<Conn> {
        let permit = tokio::time::timeout(ACQUIRE_TIMEOUT, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "all {} database connections ({}) stayed busy for {} s",
                    self.size,
                    self.name,
                    ACQUIRE_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|_| Error::Unavailable("the database pool is closed".into()))?;
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let mut found = None;
            while let Some(s) = idle.pop() {
                if !s.client.is_closed() {
                    found = Some(s);
                    break;
                }
            }
            found
        };
        let session = match idle {
            Some(s) => s,
            None => self.connect().await?,
        };
        Ok(Conn {
            session: Some(session),
            pool: self.clone(),
            permit: Some(permit),
            broken: false,
            in_txn: false,
            begin_pending: false,
        })
    }
}

/// A session taken from a pool; given back when dropped (rolled back first if a transaction is
/// open, dropped instead if it failed).
struct Conn {
    session: Option<Session>,
    pool: Arc<Pool>,
    permit: Option<OwnedSemaphorePermit>,
    broken: bool,
    in_txn: bool,
    /// `BEGIN` not sent yet: it goes out with the next statement, in the same round trip.
    begin_pending: bool,
}

impl Conn {
    fn session(&mut self) -> Result<&mut Session> {
        self.session
            .as_mut()
            .ok_or_else(|| Error::Internal("database session already given back".into()))
    }

    async fn statement(&mut self, sql: &'static str) -> Result<Statement> {
        let s = self.session()?;
        if let Some(st) = s.statements.get(sql) {
            return Ok(st.clone());
        }
        match s.client.prepare(sql).await {
            Ok(st) => {
                s.statements.insert(sql, st.clone());
                Ok(st)
            }
            Err(e) => {
                self.broken = true;
                Err(db_err("prepare", &e))
            }
        }
    }

    async fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let st = self.statement(sql).await?;
        let begin = std::mem::take(&mut self.begin_pending);
        let client = &self.session()?.client;
        let r = if begin {
            // Pipelined: both requests are sent before either answer is awaited.
            let (b, q) = tokio::join!(client.batch_execute("BEGIN"), client.query(&st, params));
            b.and(q)
        } else {
            client.query(&st, params).await
        };
        r.map_err(|e| {
            self.broken = true;
            db_err("query", &e)
        })
    }

    async fn opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        Ok(self.query(sql, params).await?.into_iter().next())
    }

    async fn exec(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let st = self.statement(sql).await?;
        let begin = std::mem::take(&mut self.begin_pending);
        let client = &self.session()?.client;
        let r = if begin {
            let (b, q) = tokio::join!(client.batch_execute("BEGIN"), client.execute(&st, params));
            b.and(q)
        } else {
            client.execute(&st, params).await
        };
        r.map_err(|e| {
            self.broken = true;
            db_err("write", &e)
        })
    }

    async fn simple(&mut self, sql: &'static str) -> Result<()> {
        let r = self.session()?.client.batch_execute(sql).await;
        r.map_err(|e| {
            self.broken = true;
            db_err(sql, &e)
        })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        if self.broken || session.client.is_closed() {
            return;
        }
        let pool = self.pool.clone();
        let permit = self.permit.take();
        if !self.in_txn || self.begin_pending {
            pool.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(session);
            drop(permit);
            return;
        }
        // A unit dropped without commit: roll back, then give the session back. Without a
        // runtime the session is closed instead (the server rolls back).
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if session.client.batch_execute("ROLLBACK").await.is_ok() {
                    pool.idle
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(session);
                }
                drop(permit);
            });
        }
    }
}

/// The PostgreSQL engine (see the module documentation).
pub struct PgStore {
    units: Arc<Pool>,
    reads: Arc<Pool>,
    changes: broadcast::Sender<Change>,
}

impl PgStore {
    /// Connects and brings the schema up to date. Fails `UNAVAILABLE` when the database cannot
    /// be reached, with a configuration error when the schema is newer than this broker.
    pub async fn connect(settings: PgSettings) -> Result<Self> {
        let mut config: tokio_postgres::Config = settings
            .dsn
            .parse()
            .map_err(|e| Error::Config(format!("not a PostgreSQL connection string: {e}")))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        if settings.tls.is_some() {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        if config.get_application_name().is_none() {
            config.application_name("jitbroker");
        }
        let pool = |name| {
            Arc::new(Pool {
                config: config.clone(),
                tls: settings.tls.clone(),
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(settings.pool_size)),
                size: settings.pool_size,
                name,
            })
        };
        let store = Self {
            units: pool("units of work"),
            reads: pool("reads"),
            changes: broadcast::channel(256).0,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the migrations this database lacks, once, whichever replica gets there first.
    async fn migrate(&self) -> Result<()> {
        let mut c = self.units.get().await?;
        c.in_txn = true;
        c.simple("BEGIN").await?;
        c.exec("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        c.simple(
            "CREATE TABLE IF NOT EXISTS jitbroker_schema (version integer PRIMARY KEY, \
             applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
        let row = c
            .opt("SELECT max(version) FROM jitbroker_schema", &[])
            .await?;
        let have: i32 = match row {
            Some(r) => col::<Option<i32>>(&r, 0)?.unwrap_or(0),
            None => 0,
        };
        let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
        if have > known {
            return Err(Error::Config(format!(
                "the database schema is at version {have}, newer than this broker's {known}: \
                 upgrade the broker (or restore the database it was made with)"
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(have as usize) {
            let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
            let r = c.session()?.client.batch_execute(sql).await;
            r.map_err(|e| {
                c.broken = true;
                db_err(&format!("migration to version {version}"), &e)
            })?;
            c.exec(
                "INSERT INTO jitbroker_schema (version) VALUES ($1)",
                &[&version],
            )
            .await?;
            tracing::info!(version, "database schema migrated");
        }
        c.simple("COMMIT").await?;
        c.in_txn = false;
        Ok(())
    }

    /// The database's clock minus ours, in milliseconds.
    pub async fn clock_skew_ms(&self, now: UnixMillis) -> Result<i64> {
        let mut c = self.reads.get().await?;
        let row = c
            .opt(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                &[],
            )
            .await?
            .ok_or_else(|| Error::Storage("no clock from the database".into()))?;
        Ok(col::<i64>(&row, 0)?.saturating_sub(now))
    }

    async fn read(&self) -> Result<Conn> {
        self.reads.get().await
    }
}

fn task_of(row: &Row, i: usize) -> Result<Task> {
    dec("task", &col::<Vec<u8>>(row, i)?)
}

fn ids<T>(rows: Vec<Row>, parse: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    rows.iter().map(|r| parse(&col::<String>(r, 0)?)).collect()
}

impl Store for PgStore {
    fn begin(&self) -> Fut<'_, Box<dyn Uow<'_> + '_>> {
        Box::pin(async move {
            let conn = self.units.get().await?;
            let u: Box<dyn Uow<'_> + '_> = Box::new(PgUow {
                store: self,
                conn,
                audit: Vec::new(),
                changes: Vec::new(),
                fences: Vec::new(),
            });
            Ok(u)
        })
    }

    fn get_task(&self, id: &TaskId) -> Fut<'_, Option<Task>> {
        let id = id.as_str().to_owned();
        Box::pin(async move {
            let mut c = self.read().await?;
            match c
                .opt("SELECT record FROM tasks WHERE id = $1", &[&id])
                .await?
            {
                Some(r) => Ok(Some(task_of(&r, 0)?)),
                None => Ok(None),
            }
        })
    }

    fn task_by_idempotency_key(&self, owner: &SpiffeId, key: &str) -> Fut<'_, Option<TaskId>> {
        let owner = owner.as_str().to_owned();
        let key = key.to_owned();
        Box::pin(async move {
            let mut c = self.read().await?;
            let row = c
                .opt(
                    "SELECT id FROM tasks WHERE owner = $1 AND idem_key = $2",
                    &[&owner, &key],
                )
                .await?;
            row.map(|r| TaskId::parse(&col::<String>(&r, 0)?))
                .transpose()
        })
    }

    fn tasks_of_identity(&self, owner: &SpiffeId) -> Fut<'_, Vec<TaskId>> {
        let owner = owner.as_str().to_owned();
        Box::pin(async move {
            let mut c = self.read().await?;
            let rows = c
                .query(
                    "SELECT id FROM tasks WHERE owner = $1 AND active ORDER BY id",
                    &[&owner],
                )
                .await?;
            ids(rows, TaskId::parse)
        })
    }

    fn children_of(&self, task: &TaskId) -> Fut<'_, Vec<TaskId>> {
        let task = task.as_str().to_owned();
        Box::pin(async move {
            let mut c = self.read().await?;
            // A purged parent has no children index any more (its children stay).
            let rows = c
                .query(
                    "SELECT c.id FROM tasks c WHERE c.parent = $1 \
                     AND EXISTS (SELECT 1 FROM tasks p WHERE p.id = $1) ORDER BY c.id",
                    &[&task],
                )
                .await?;
            ids(rows, TaskId::parse)
        })
    }

    fn scan_tasks(&self, after: Option<&TaskId>, limit: usize) -> Fut<'_, Vec<Task>> {
        let after = after.map(|a| a.as_str().to_owned()).unwrap_or_default();
        Box::pin(async move {
            let mut c = self.read().await?;
            let rows = c
                .query(
                    "SELECT record FROM tasks WHERE id > $1 ORDER BY id LIMIT $2",
                    &[&after, &limit_of(limit)],
                )
                .await?;
            rows.iter().map(|r| task_of(r, 0)).collect()
        })
    }

    fn get_credential(&self, id: &CredentialId) -> Fut<'_, Option<CredentialRecord>> {
        let id = id.as_str().to_owned();
        Box::pin(async move {
            let mut c = self.read().await?;
            match c
                .opt("SELECT record FROM credentials WHERE id = $1", &[&id])
                .await?
            {
                Some(r) => Ok(Some(dec("credential", &col::<Vec<u8>>(&r, 0)?)?)),
                None => Ok(None),
            }
        })
    }

    fn credential_sealed(&self, id: &CredentialId) -> Fut<'_, Option<Vec<u8>>> {
        let id = id.as_str().to_owned();
        Box::pin(async move {
            let mut c = self.read().await?;
            match c
                .opt("SELECT sealed FROM credentials WHERE id = $1", &[&id])
                .await?
            {
                Some(r) => col::<Option<Vec<u8>>>(&r, 0),
                None => Ok(None),
            }
        })
    }

    fn credential_by_index(&self, index: &[u8; 32]) -> Fut<'_, Option<CredentialId>> {
        let index = index.to_vec();
        Box::pin(async move {
            let mut c = self.read().await?;
            let row = c
                .opt(
                    "SELECT id FROM credentials WHERE secret_hash = $1",
                    &[&index],
                )
                .await?;
            row.map(|r| CredentialId::parse(&col::<String>(&r, 0)?))
                .transpose()
        })
    }

    fn credential_by_idempotency_key(
        &self,
        task: &TaskId,
        key: &str,
    ) -> Fut<'_, Option<CredentialId>> {
        let task = task.as_str().to_owned();
        let key = key.to_owned();
        Box::pin(async move {
            let mut c = self.read().await?;
            let row = c
                .opt(
                    "SELECT id FROM credentials WHERE task_id = $1 AND idem_key = $2",
                    &[&task, &key],
                )
                .await?;
            row.map(|r| CredentialId::parse(&col::<String>(&r, 0)?))
                .transpose()
        })
    }

    fn credentials_of_task(&self, task: &TaskId) -> Fut<'_, Vec<CredentialId>> {
        let task = task.as_str().to_owned();
        Box::pin(async move {
            let mut c = self.read().await?;
            let rows = c
                .query(
                    "SELECT id FROM credentials WHERE task_id = $1 ORDER BY id",
                    &[&task],
                )
                .await?;
            ids(rows, CredentialId::parse)
        })
    }

    fn get_approval(&self, id: &ApprovalId) -> Fut<'_, Option<Approval>> {
        let id = id.as_str().to_owned();
        Box::pin(async move {
            let mut c = self.read().await?;
            match c
                .opt("SELECT record FROM approvals WHERE id = $1", &[&id])
                .await?
            {
                Some(r) => Ok(Some(dec("approval", &col::<Vec<u8>>(&r, 0)?)?)),
                None => Ok(None),
            }
        })
    }

    fn approval_for_grant(&self, task: &TaskId, grant: &Grant) -> Fut<'_, Option<ApprovalId>> {
        let task = task.as_str().to_owned();
        let grant = grant.clone();
        Box::pin(async move {
            let mut c = self.read().await?;
            let row = c
                .opt(
                    "SELECT approval_id FROM approval_grants \
                     WHERE task_id = $1 AND resource = $2 AND action = $3",
                    &[&task, &grant.resource, &grant.action],
                )
                .await?;
            row.map(|r| ApprovalId::parse(&col::<String>(&r, 0)?))
                .transpose()
        })
    }

    fn list_approvals(&self) -> Fut<'_, Vec<Approval>> {
        Box::pin(async move {
            let mut c = self.read().await?;
            let rows = c
                .query("SELECT record FROM approvals ORDER BY id", &[])
                .await?;
            rows.iter()
                .map(|r| dec("approval", &col::<Vec<u8>>(r, 0)?))
                .collect()
        })
    }

    fn is_blocked(&self, id: &SpiffeId) -> Fut<'_, bool> {
        let id = id.as_str().to_owned();
        Box::pin(async move {
            let mut c = self.read().await?;
            let row = c
                .opt(
                    "SELECT blocked FROM identities WHERE spiffe_id = $1",
                    &[&id],
                )
                .await?;
            match row {
                Some(r) => col::<bool>(&r, 0),
                None => Ok(false),
            }
        })
    }

    fn blocked_identities(&self) -> Fut<'_, Vec<SpiffeId>> {
        Box::pin(async move {
            let mut c = self.read().await?;
            let rows = c
                .query(
                    "SELECT spiffe_id FROM identities WHERE blocked ORDER BY spiffe_id",
                    &[],
                )
                .await?;
            ids(rows, spiffe)
        })
    }

    fn upstream_objects(&self) -> Fut<'_, Vec<UpstreamObject>> {
        Box::pin(async move {
            let mut c = self.read().await?;
            let rows = c
                .query("SELECT record FROM upstream ORDER BY resource, name", &[])
                .await?;
            rows.iter()
                .map(|r| dec("upstream account", &col::<Vec<u8>>(r, 0)?))
                .collect()
        })
    }

    fn revocations(&self) -> Fut<'_, Vec<Revocation>> {
        Box::pin(async move {
            let mut c = self.read().await?;
            let rows = c
                .query(
                    "SELECT record FROM revocations ORDER BY resource, name",
                    &[],
                )
                .await?;
            rows.iter()
                .map(|r| dec("revocation", &col::<Vec<u8>>(r, 0)?))
                .collect()
        })
    }

    fn next_due(&self) -> Fut<'_, Option<UnixMillis>> {
        Box::pin(async move {
            let mut c = self.read().await?;
            let row = c.opt("SELECT min(at) FROM due", &[]).await?;
            match row {
                Some(r) => col::<Option<i64>>(&r, 0),
                None => Ok(None),
            }
        })
    }

    fn audit_head(&self) -> Fut<'_, Anchor> {
        Box::pin(async move {
            let mut c = self.read().await?;
            let row = c
                .opt("SELECT next, prev FROM audit_head WHERE id = 1", &[])
                .await?
                .ok_or_else(|| Error::Storage("the audit head row is missing".into()))?;
            Ok(head_of(&row)?.head())
        })
    }

    fn audit_scan(&self, from: u64, limit: usize) -> Fut<'_, Vec<(u64, Vec<u8>)>> {
        Box::pin(async move {
            let from = i64::try_from(from).unwrap_or(i64::MAX);
            let mut c = self.read().await?;
            let rows = c
                .query(
                    "SELECT seq, entry FROM audit WHERE seq >= $1 ORDER BY seq LIMIT $2",
                    &[&from, &limit_of(limit)],
                )
                .await?;
            rows.iter()
                .map(|r| Ok((as_u64(col::<i64>(r, 0)?, "audit seq")?, col(r, 1)?)))
                .collect()
        })
    }

    fn audit_remove_through(&self, seq: u64) -> Fut<'_, u64> {
        Box::pin(async move {
            let seq = i64::try_from(seq).unwrap_or(i64::MAX);
            let mut c = self.read().await?;
            c.exec("DELETE FROM audit WHERE seq <= $1", &[&seq]).await
        })
    }

    fn counts(&self) -> Fut<'_, Counts> {
        Box::pin(async move {
            let mut c = self.read().await?;
            let row = c
                .opt(
                    "SELECT (SELECT count(*) FROM tasks WHERE active), \
                     (SELECT count(*) FROM credentials WHERE secret_hash IS NOT NULL)",
                    &[],
                )
                .await?
                .ok_or_else(|| Error::Storage("no counts from the database".into()))?;
            Ok(Counts {
                tasks: as_u64(col::<i64>(&row, 0)?, "count")?,
                credentials: as_u64(col::<i64>(&row, 1)?, "count")?,
            })
        })
    }

    fn meta_get(&self, key: &str) -> Fut<'_, Option<Vec<u8>>> {
        let key = key.to_owned();
        Box::pin(async move {
            let mut c = self.read().await?;
            match c
                .opt("SELECT value FROM meta WHERE key = $1", &[&key])
                .await?
            {
                Some(r) => Ok(Some(col(&r, 0)?)),
                None => Ok(None),
            }
        })
    }

    fn meta_put_if_absent(&self, key: &str, value: Vec<u8>) -> Fut<'_, Vec<u8>> {
        let key = key.to_owned();
        Box::pin(async move {
            let mut c = self.read().await?;
            c.exec(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                &[&key, &value],
            )
            .await?;
            let row = c
                .opt("SELECT value FROM meta WHERE key = $1", &[&key])
                .await?
                .ok_or_else(|| Error::Storage(format!("meta {key} vanished")))?;
            col(&row, 0)
        })
    }

    fn meta_cas(&self, key: &str, expected: Option<Vec<u8>>, value: Vec<u8>) -> Fut<'_, bool> {
        let key = key.to_owned();
        Box::pin(async move {
            let mut c = self.read().await?;
            let n = match &expected {
                None => {
                    c.exec(
                        "INSERT INTO meta (key, value) VALUES ($1, $2) \
                         ON CONFLICT (key) DO NOTHING",
                        &[&key, &value],
                    )
                    .await?
                }
                Some(old) => {
                    c.exec(
                        "UPDATE meta SET value = $3 WHERE key = $1 AND value = $2",
                        &[&key, old, &value],
                    )
                    .await?
                }
            };
            if n == 1 {
                let _ = self.changes.send(Change::Meta(key));
            }
            Ok(n == 1)
        })
    }

    fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: UnixMillis,
        ttl_ms: i64,
    ) -> Fut<'_, Option<Lease>> {
        let name = name.to_owned();
        let holder = holder.to_owned();
        Box::pin(async move {
            let until = now.saturating_add(ttl_ms);
            let mut c = self.read().await?;
            let row = c
                .opt(
                    "INSERT INTO leases AS l (name, holder, epoch, valid_until) \
                     VALUES ($1, $2, 1, $4) \
                     ON CONFLICT (name) DO UPDATE SET \
                       epoch = CASE WHEN l.holder = EXCLUDED.holder THEN l.epoch \
                               ELSE l.epoch + 1 END, \
                       holder = EXCLUDED.holder, valid_until = EXCLUDED.valid_until \
                     WHERE l.holder = EXCLUDED.holder OR l.valid_until <= $3 \
                     RETURNING epoch, valid_until",
                    &[&name, &holder, &now, &until],
                )
                .await?;
            match row {
                Some(r) => Ok(Some(Lease {
                    epoch: as_u64(col::<i64>(&r, 0)?, "lease epoch")?,
                    valid_until: col(&r, 1)?,
                })),
                None => Ok(None),
            }
        })
    }

    fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    fn shared(&self) -> bool {
        true
    }

    fn check_ready(&self, now: UnixMillis, max_skew_ms: i64) -> Fut<'_, ()> {
        Box::pin(async move {
            let skew = self.clock_skew_ms(now).await?;
            if skew.abs() > max_skew_ms {
                return Err(Error::Unavailable(format!(
                    "this replica's clock differs from the database's by {skew} ms (at most \
                     {max_skew_ms} ms allowed): fix time synchronisation"
                )));
            }
            Ok(())
        })
    }
}

/// Refuses unless `lease` is still held with `epoch`. `hold`: keep the lease row share-locked
/// to the end of the transaction, so that a takeover (an update of the row) waits until this
/// unit has committed: checked so as the last step before the commit.
async fn check_fence(c: &mut Conn, lease: &str, epoch: u64, hold: bool) -> Result<()> {
    let e = as_i64(epoch, "lease epoch")?;
    let sql = if hold {
        "SELECT 1 FROM leases WHERE name = $1 AND epoch = $2 FOR SHARE"
    } else {
        "SELECT 1 FROM leases WHERE name = $1 AND epoch = $2"
    };
    if c.opt(sql, &[&lease, &e]).await?.is_some() {
        Ok(())
    } else {
        Err(Error::Unavailable(format!(
            "the lease {lease} (epoch {epoch}) is no longer held by this worker"
        )))
    }
}

fn head_of(row: &Row) -> Result<Head> {
    let next = as_u64(col::<i64>(row, 0)?, "audit head")?;
    let prev: Vec<u8> = col(row, 1)?;
    let prev: [u8; 32] = prev
        .try_into()
        .map_err(|_| Error::Storage("corrupt audit head hash".into()))?;
    Ok(Head::from_parts(next, prev))
}

/// A unit of work: one transaction (see the module documentation).
struct PgUow<'s> {
    store: &'s PgStore,
    conn: Conn,
    audit: Vec<(UnixMillis, Event)>,
    changes: Vec<Change>,
    /// Leases this unit's work needs (checked again, and held, at commit).
    fences: Vec<(String, u64)>,
}

impl PgUow<'_> {
    /// The transaction, begun on first use.
    async fn tx(&mut self) -> Result<&mut Conn> {
        if !self.conn.in_txn {
            // Sent with the unit's first statement (Conn::query, Conn::exec).
            self.conn.in_txn = true;
            self.conn.begin_pending = true;
        }
        Ok(&mut self.conn)
    }
}

impl<'s> Uow<'s> for PgUow<'s> {
    fn lock_identity<'a>(&'a mut self, id: &'a SpiffeId) -> Fut<'a, IdentityRow> {
        Box::pin(async move {
            let c = self.tx().await?;
            let sql = "SELECT blocked FROM identities WHERE spiffe_id = $1 FOR UPDATE";
            let row = match c.opt(sql, &[&id.as_str()]).await? {
                Some(r) => r,
                None => {
                    c.exec(
                        "INSERT INTO identities (spiffe_id) VALUES ($1) \
                         ON CONFLICT (spiffe_id) DO NOTHING",
                        &[&id.as_str()],
                    )
                    .await?;
                    c.opt(sql, &[&id.as_str()])
                        .await?
                        .ok_or_else(|| Error::Storage(format!("identity row of {id} vanished")))?
                }
            };
            Ok(IdentityRow {
                blocked: col(&row, 0)?,
            })
        })
    }

    fn lock_task<'a>(&'a mut self, id: &'a TaskId) -> Fut<'a, Option<Task>> {
        Box::pin(async move {
            let c = self.tx().await?;
            match c
                .opt(
                    "SELECT record FROM tasks WHERE id = $1 FOR UPDATE",
                    &[&id.as_str()],
                )
                .await?
            {
                Some(r) => Ok(Some(task_of(&r, 0)?)),
                None => Ok(None),
            }
        })
    }

    fn try_lock_task<'a>(&'a mut self, id: &'a TaskId) -> Fut<'a, Option<Option<Task>>> {
        Box::pin(async move {
            let c = self.tx().await?;
            if let Some(r) = c
                .opt(
                    "SELECT record FROM tasks WHERE id = $1 FOR UPDATE SKIP LOCKED",
                    &[&id.as_str()],
                )
                .await?
            {
                return Ok(Some(Some(task_of(&r, 0)?)));
            }
            // No row: either there is none (locked: nothing to hold) or someone holds it.
            let exists = c
                .opt("SELECT 1 FROM tasks WHERE id = $1", &[&id.as_str()])
                .await?
                .is_some();
            Ok(if exists { None } else { Some(None) })
        })
    }

    fn insert_task<'a>(&'a mut self, task: &'a Task) -> Fut<'a, Inserted<TaskId>> {
        Box::pin(async move {
            let record = enc(task)?;
            let active = task.state == TaskState::Active;
            let parent = task.parent.as_ref().map(|p| p.as_str());
            let c = self.tx().await?;
            let n = c
                .exec(
                    "INSERT INTO tasks (id, owner, active, parent, idem_key, record) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (owner, idem_key) DO NOTHING",
                    &[
                        &task.id.as_str(),
                        &task.owner.as_str(),
                        &active,
                        &parent,
                        &task.idempotency_key,
                        &record,
                    ],
                )
                .await?;
            if n == 0 {
                let row = c
                    .opt(
                        "SELECT id FROM tasks WHERE owner = $1 AND idem_key = $2",
                        &[&task.owner.as_str(), &task.idempotency_key],
                    )
                    .await?
                    .ok_or_else(|| {
                        Error::Unavailable("a concurrent task creation: try again".into())
                    })?;
                return Ok(Inserted::Existing(TaskId::parse(&col::<String>(&row, 0)?)?));
            }
            c.exec(
                "INSERT INTO due (at, kind, id) VALUES ($1, 't', $2) ON CONFLICT DO NOTHING",
                &[&task.expires_at.max(0), &task.id.as_str()],
            )
            .await?;
            Ok(Inserted::New)
        })
    }

    fn update_task<'a>(&'a mut self, task: &'a Task) -> Fut<'a, ()> {
        Box::pin(async move {
            let record = enc(task)?;
            let active = task.state == TaskState::Active;
            let c = self.tx().await?;
            let n = c
                .exec(
                    "UPDATE tasks SET active = $2, record = $3 WHERE id = $1",
                    &[&task.id.as_str(), &active, &record],
                )
                .await?;
            if n == 0 {
                return Err(Error::Storage(format!("task {} vanished", task.id)));
            }
            if let Some(at) = task.purge_at.filter(|_| !active) {
                c.exec(
                    "INSERT INTO due (at, kind, id) VALUES ($1, 'p', $2) ON CONFLICT DO NOTHING",
                    &[&at.max(0), &task.id.as_str()],
                )
                .await?;
            }
            Ok(())
        })
    }

    fn purge_task<'a>(&'a mut self, id: &'a TaskId) -> Fut<'a, bool> {
        Box::pin(async move {
            let c = self.tx().await?;
            let id = id.as_str();
            let row = c
                .opt("SELECT active FROM tasks WHERE id = $1 FOR UPDATE", &[&id])
                .await?;
            if let Some(r) = &row
                && col::<bool>(r, 0)?
            {
                // Only ended tasks are purged.
                return Ok(false);
            }
            c.exec(
                "DELETE FROM due WHERE kind = 'c' AND id IN \
                 (SELECT id FROM credentials WHERE task_id = $1)",
                &[&id],
            )
            .await?;
            c.exec("DELETE FROM credentials WHERE task_id = $1", &[&id])
                .await?;
            c.exec("DELETE FROM approval_grants WHERE task_id = $1", &[&id])
                .await?;
            c.exec("DELETE FROM approvals WHERE task_id = $1", &[&id])
                .await?;
            c.exec("DELETE FROM due WHERE kind = 't' AND id = $1", &[&id])
                .await?;
            let n = c.exec("DELETE FROM tasks WHERE id = $1", &[&id]).await?;
            Ok(n > 0)
        })
    }

    fn insert_credential<'a>(
        &'a mut self,
        rec: &'a CredentialRecord,
        secret: &'a SealedSecret,
    ) -> Fut<'a, Inserted<CredentialId>> {
        Box::pin(async move {
            let record = enc(rec)?;
            let active = rec.state == CredentialState::Active;
            let (sealed, hash) = if active {
                (Some(secret.sealed.as_slice()), Some(&secret.index[..]))
            } else {
                (None, None)
            };
            let c = self.tx().await?;
            let n = c
                .exec(
                    "INSERT INTO credentials (id, task_id, idem_key, secret_hash, sealed, record) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (task_id, idem_key) DO NOTHING",
                    &[
                        &rec.id.as_str(),
                        &rec.task_id.as_str(),
                        &rec.idempotency_key,
                        &hash,
                        &sealed,
                        &record,
                    ],
                )
                .await?;
            if n == 0 {
                let row = c
                    .opt(
                        "SELECT id FROM credentials WHERE task_id = $1 AND idem_key = $2",
                        &[&rec.task_id.as_str(), &rec.idempotency_key],
                    )
                    .await?
                    .ok_or_else(|| {
                        Error::Unavailable("a concurrent credential issuance: try again".into())
                    })?;
                return Ok(Inserted::Existing(CredentialId::parse(&col::<String>(
                    &row, 0,
                )?)?));
            }
            c.exec(
                "INSERT INTO due (at, kind, id) VALUES ($1, 'c', $2) ON CONFLICT DO NOTHING",
                &[&rec.expires_at.max(0), &rec.id.as_str()],
            )
            .await?;
            Ok(Inserted::New)
        })
    }

    fn update_credential<'a>(&'a mut self, rec: &'a CredentialRecord) -> Fut<'a, ()> {
        Box::pin(async move {
            let record = enc(rec)?;
            let active = rec.state == CredentialState::Active;
            let c = self.tx().await?;
            let n = c
                .exec(
                    "UPDATE credentials SET record = $2, \
                       sealed = CASE WHEN $3 THEN sealed END, \
                       secret_hash = CASE WHEN $3 THEN secret_hash END \
                     WHERE id = $1",
                    &[&rec.id.as_str(), &record, &active],
                )
                .await?;
            if n == 0 {
                return Err(Error::Storage(format!("credential {} vanished", rec.id)));
            }
            Ok(())
        })
    }

    fn put_approval<'a>(&'a mut self, a: &'a Approval) -> Fut<'a, ()> {
        Box::pin(async move {
            let record = enc(a)?;
            let c = self.tx().await?;
            c.exec(
                "INSERT INTO approvals (id, task_id, record) VALUES ($1, $2, $3) \
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                &[&a.id.as_str(), &a.task_id.as_str(), &record],
            )
            .await?;
            c.exec(
                "INSERT INTO approval_grants (task_id, resource, action, approval_id) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (task_id, resource, action) \
                 DO UPDATE SET approval_id = EXCLUDED.approval_id",
                &[
                    &a.task_id.as_str(),
                    &a.grant.resource,
                    &a.grant.action,
                    &a.id.as_str(),
                ],
            )
            .await?;
            Ok(())
        })
    }

    fn consume_approval<'a>(
        &'a mut self,
        id: &'a ApprovalId,
        _by: &'a str,
        now: UnixMillis,
    ) -> Fut<'a, bool> {
        Box::pin(async move {
            let c = self.tx().await?;
            let Some(row) = c
                .opt(
                    "SELECT record FROM approvals WHERE id = $1 FOR UPDATE",
                    &[&id.as_str()],
                )
                .await?
            else {
                return Ok(false);
            };
            let mut a: Approval = dec("approval", &col::<Vec<u8>>(&row, 0)?)?;
            if a.state != ApprovalState::Approved || now >= a.expires_at {
                return Ok(false);
            }
            a.state = ApprovalState::Used;
            let record = enc(&a)?;
            c.exec(
                "UPDATE approvals SET record = $2 WHERE id = $1",
                &[&id.as_str(), &record],
            )
            .await?;
            Ok(true)
        })
    }

    fn set_blocked<'a>(&'a mut self, id: &'a SpiffeId, blocked: bool) -> Fut<'a, bool> {
        Box::pin(async move {
            let c = self.tx().await?;
            let before = match c
                .opt(
                    "SELECT blocked FROM identities WHERE spiffe_id = $1 FOR UPDATE",
                    &[&id.as_str()],
                )
                .await?
            {
                Some(r) => col::<bool>(&r, 0)?,
                None => false,
            };
            c.exec(
                "INSERT INTO identities (spiffe_id, blocked) VALUES ($1, $2) \
                 ON CONFLICT (spiffe_id) DO UPDATE SET blocked = EXCLUDED.blocked",
                &[&id.as_str(), &blocked],
            )
            .await?;
            self.changes.push(Change::Blocked(id.clone(), blocked));
            Ok(before)
        })
    }

    fn put_upstream<'a>(&'a mut self, o: &'a UpstreamObject) -> Fut<'a, ()> {
        Box::pin(async move {
            let record = enc(o)?;
            let c = self.tx().await?;
            c.exec(
                "INSERT INTO upstream (resource, name, record) VALUES ($1, $2, $3) \
                 ON CONFLICT (resource, name) DO UPDATE SET record = EXCLUDED.record",
                &[&o.resource, &o.name, &record],
            )
            .await?;
            Ok(())
        })
    }

    fn queue_revocation<'a>(&'a mut self, r: &'a Revocation) -> Fut<'a, ()> {
        Box::pin(async move {
            let record = enc(r)?;
            let c = self.tx().await?;
            c.exec(
                "DELETE FROM upstream WHERE resource = $1 AND name = $2",
                &[&r.resource, &r.name],
            )
            .await?;
            c.exec(
                "INSERT INTO revocations (resource, name, next_attempt_at, record) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (resource, name) DO UPDATE SET \
                 next_attempt_at = EXCLUDED.next_attempt_at, record = EXCLUDED.record",
                &[&r.resource, &r.name, &r.next_attempt_at, &record],
            )
            .await?;
            Ok(())
        })
    }

    fn update_revocation<'a>(&'a mut self, r: &'a Revocation) -> Fut<'a, ()> {
        Box::pin(async move {
            let record = enc(r)?;
            let c = self.tx().await?;
            c.exec(
                "UPDATE revocations SET next_attempt_at = $3, record = $4, claimed_until = 0 \
                 WHERE resource = $1 AND name = $2",
                &[&r.resource, &r.name, &r.next_attempt_at, &record],
            )
            .await?;
            Ok(())
        })
    }

    fn remove_revocation<'a>(&'a mut self, resource: &'a str, name: &'a str) -> Fut<'a, bool> {
        Box::pin(async move {
            let c = self.tx().await?;
            let n = c
                .exec(
                    "DELETE FROM revocations WHERE resource = $1 AND name = $2",
                    &[&resource, &name],
                )
                .await?;
            Ok(n > 0)
        })
    }

    fn claim_revocations(
        &mut self,
        now: UnixMillis,
        limit: usize,
        hold_ms: i64,
    ) -> Fut<'_, Vec<Revocation>> {
        Box::pin(async move {
            let until = now.saturating_add(hold_ms);
            let c = self.tx().await?;
            let rows = c
                .query(
                    "UPDATE revocations r SET claimed_until = $2 FROM ( \
                       SELECT resource, name FROM revocations \
                       WHERE next_attempt_at <= $1 AND claimed_until <= $1 \
                       ORDER BY resource, name LIMIT $3 FOR UPDATE SKIP LOCKED) q \
                     WHERE r.resource = q.resource AND r.name = q.name \
                     RETURNING r.resource, r.name, r.record",
                    &[&now, &until, &limit_of(limit)],
                )
                .await?;
            let mut out: Vec<(String, String, Revocation)> = rows
                .iter()
                .map(|r| {
                    Ok((
                        col(r, 0)?,
                        col(r, 1)?,
                        dec("revocation", &col::<Vec<u8>>(r, 2)?)?,
                    ))
                })
                .collect::<Result<_>>()?;
            out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
            Ok(out.into_iter().map(|(_, _, r)| r).collect())
        })
    }

    fn claim_due(&mut self, now: UnixMillis, limit: usize) -> Fut<'_, Vec<(UnixMillis, Expiring)>> {
        Box::pin(async move {
            let now = now.max(0);
            let c = self.tx().await?;
            let rows = c
                .query(
                    "SELECT at, kind, id FROM due WHERE at <= $1 ORDER BY at, kind, id \
                     LIMIT $2 FOR UPDATE SKIP LOCKED",
                    &[&now, &limit_of(limit)],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok((
                        col::<i64>(r, 0)?,
                        parse_due(&col::<String>(r, 1)?, &col::<String>(r, 2)?)?,
                    ))
                })
                .collect()
        })
    }

    fn remove_due<'a>(&'a mut self, at: UnixMillis, what: &'a Expiring) -> Fut<'a, ()> {
        Box::pin(async move {
            let (kind, id) = due_kind(what);
            let c = self.tx().await?;
            c.exec(
                "DELETE FROM due WHERE at = $1 AND kind = $2 AND id = $3",
                &[&at.max(0), &kind, &id],
            )
            .await?;
            Ok(())
        })
    }

    fn meta_put<'a>(&'a mut self, key: &'a str, value: Vec<u8>) -> Fut<'a, ()> {
        Box::pin(async move {
            let c = self.tx().await?;
            c.exec(
                "INSERT INTO meta (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&key, &value],
            )
            .await?;
            self.changes.push(Change::Meta(key.to_owned()));
            Ok(())
        })
    }

    fn fence<'a>(&'a mut self, lease: &'a str, epoch: u64) -> Fut<'a, ()> {
        Box::pin(async move {
            self.fences.push((lease.to_owned(), epoch));
            let c = self.tx().await?;
            check_fence(c, lease, epoch, false).await
        })
    }

    fn audit(&mut self, time: UnixMillis, event: Event) {
        self.audit.push((time, event));
    }

    fn commit(mut self: Box<Self>) -> Fut<'s, Vec<u64>> {
        Box::pin(async move {
            if self.conn.in_txn && self.conn.begin_pending {
                // Begun but nothing sent: nothing to commit on the server.
                self.conn.in_txn = false;
                self.conn.begin_pending = false;
            }
            if !self.conn.in_txn {
                if self.audit.is_empty() && self.fences.is_empty() {
                    return Ok(Vec::new());
                }
                self.tx().await?;
            }
            let fences = std::mem::take(&mut self.fences);
            for (lease, epoch) in &fences {
                check_fence(&mut self.conn, lease, *epoch, true).await?;
            }
            let mut seqs = Vec::with_capacity(self.audit.len());
            let mut lines = Vec::with_capacity(self.audit.len());
            if self.audit.is_empty() {
                self.conn.simple("COMMIT").await?;
            } else {
                let events = std::mem::take(&mut self.audit);
                let c = &mut self.conn;
                // The chain's head row: held from here to the commit, the last step.
                let row = c
                    .opt(
                        "SELECT next, prev FROM audit_head WHERE id = 1 FOR UPDATE",
                        &[],
                    )
                    .await?
                    .ok_or_else(|| Error::Storage("the audit head row is missing".into()))?;
                let mut head = head_of(&row)?;
                let mut numbers = Vec::with_capacity(events.len());
                for (time, event) in events {
                    let (seq, bytes, hash) = head.entry(time, event)?;
                    numbers.push(as_i64(seq, "audit seq")?);
                    head.advance(hash);
                    seqs.push(seq);
                    lines.push(bytes);
                }
                let (next, prev) = head.parts();
                let next = as_i64(next, "audit seq")?;
                let st = c
                    .statement(
                        "WITH appended AS (INSERT INTO audit (seq, entry) \
                           SELECT * FROM unnest($1::bigint[], $2::bytea[])) \
                         UPDATE audit_head SET next = $3, prev = $4 WHERE id = 1",
                    )
                    .await?;
                let prev: &[u8] = &prev[..];
                let params: [&(dyn ToSql + Sync); 4] = [&numbers, &lines, &next, &prev];
                let client = &c.session()?.client;
                // The entries, the head and the commit in one round trip.
                let (appended, committed) =
                    tokio::join!(client.execute(&st, &params), client.batch_execute("COMMIT"));
                let r = appended.and(committed);
                if let Err(e) = r {
                    c.broken = true;
                    return Err(db_err("commit", &e));
                }
            }
            self.conn.in_txn = false;
            // Logged once committed: a rolled-back unit's entries never existed.
            for bytes in lines {
                tracing::info!(
                    target: "jitbroker::audit",
                    audit = %String::from_utf8_lossy(&bytes),
                    "audit"
                );
            }
            for ch in self.changes.drain(..) {
                let _ = self.store.changes.send(ch);
            }
            Ok(seqs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::GENESIS;

    #[test]
    fn genesis_matches_the_seeded_head() {
        let seeded = MIGRATIONS[0]
            .lines()
            .find(|l| l.starts_with("INSERT INTO audit_head"))
            .unwrap();
        assert!(seeded.contains(&format!("\\x{}", hex::encode(GENESIS))));
    }

    #[test]
    fn due_kinds_round_trip() {
        let t = TaskId::generate();
        let c = CredentialId::generate();
        for what in [
            Expiring::Task(t.clone()),
            Expiring::Credential(c),
            Expiring::Purge(t),
        ] {
            let (k, id) = due_kind(&what);
            assert_eq!(parse_due(k, id).unwrap(), what);
        }
        assert!(parse_due("x", "y").is_err());
    }

    #[test]
    fn a_remote_database_without_a_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("dsn");
        std::fs::write(&f, "host=db.example.com user=jb dbname=jb").unwrap();
        let e = PgSettings::from_files("[store]", &f, None, 4)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("ca_file"), "{e}");
        std::fs::write(&f, "host=127.0.0.1 user=jb dbname=jb").unwrap();
        PgSettings::from_files("[store]", &f, None, 4).unwrap();
        std::fs::write(&f, "not a dsn = = =").unwrap();
        assert!(PgSettings::from_files("[store]", &f, None, 4).is_err());
    }
}
