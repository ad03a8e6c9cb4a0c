//! PostgreSQL credentials (DESIGN §6): one login role per credential, made with a random password
//! and `VALID UNTIL` = the credential's expiry (new logins are refused after it even if the
//! broker is gone; open sessions are ended only by revocation),
//! joined to the configured group roles and given the configured GRANT statements, all in one
//! transaction. Revocation refuses new logins, terminates the role's sessions, drops what it owns
//! and drops it; every step is idempotent, so the revocation queue can retry it blindly.
//!
//! The admin needs no superuser: `CREATEROLE`, the grant option on what the GRANT statements
//! hand out and (PostgreSQL 16+) the admin option on the group roles. Each new role is granted
//! to the admin in the same transaction that creates it, so the admin holds the privileges of
//! that role: enough to terminate its sessions (`pg_terminate_backend`) and to `DROP OWNED BY` it,
//! which a `CREATEROLE` alone does not allow. [`PostgresIssuer::preflight`] checks this at start.
//!
//! The password never reaches the server in plaintext: the role is created with a SCRAM-SHA-256
//! verifier computed here (RFC 5802 / RFC 7677), so statement logs and `pg_stat_activity` hold no
//! usable secret.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use zeroize::{Zeroize, Zeroizing};

use super::{Issued, Upstream};
use crate::config::{PostgresConfig, PostgresGrant};
use crate::error::{Error, Result};
use crate::model::{Secret, UnixMillis};

/// PBKDF2 rounds in the SCRAM verifier. Rounds slow down guessing of low-entropy (human)
/// passwords; these are 192 random bits, which no number of rounds makes weaker or stronger
/// against guessing, so the count is kept low: it is paid at every issuance and every login.
const SCRAM_ITERATIONS: u32 = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One configured PostgreSQL resource.
pub struct PostgresIssuer {
    resource: String,
    dsn: Zeroizing<String>,
    prefix: String,
    host: String,
    port: u16,
    database: String,
    grants: BTreeMap<String, PostgresGrant>,
    /// TLS to the server (required and verified) when a CA is configured.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// Admin sessions, each opened on first use and again after it breaks.
    pool: Vec<Mutex<Option<tokio_postgres::Client>>>,
    next: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for PostgresIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PostgresIssuer({} at {}:{}/{})",
            self.resource, self.host, self.port, self.database
        )
    }
}

fn upstream_err(resource: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("resource {resource}: PostgreSQL {what}: {e}"))
}

/// The causes of an error, for messages (a TLS failure hides behind "error performing TLS
/// handshake").
pub(crate) fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}

/// A TLS connector that trusts only the CA certificates in `ca`; errors name `section`'s
/// `ca_file` (e.g. `[store]`).
pub(crate) fn tls_connector(
    section: &str,
    ca: &std::path::Path,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls_pki_types::pem::PemObject;
    let bad = |why: String| Error::Config(format!("{section} ca_file {}: {why}", ca.display()));
    let pem = std::fs::read(ca).map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(c.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate".into()));
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(cfg))
}

/// Whether every host of a connection string is this machine (loopback or a unix socket):
/// the only case where a plaintext connection is accepted.
pub(crate) fn only_loopback(parsed: &tokio_postgres::Config) -> bool {
    parsed.get_hosts().iter().all(|h| match h {
        tokio_postgres::config::Host::Tcp(h) => {
            h == "localhost"
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        #[allow(
            unreachable_patterns,
            reason = "the host enum has a Unix-socket variant on Unix only"
        )]
        _ => true, // a unix socket
    }) && parsed
        .get_hostaddrs()
        .iter()
        // `hostaddr` is where the connection really goes when it is set.
        .all(std::net::IpAddr::is_loopback)
}

/// The server's own message and SQLSTATE, which tokio-postgres' Display leaves out.
pub(crate) fn pg_err(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} (SQLSTATE {})", d.message(), d.code().code()),
        None => e.to_string(),
    }
}

/// Concurrent GRANT/REVOKE on one object can fail with "tuple concurrently updated"; the
/// statement is safe to run again.
fn is_concurrent_update(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|d| d.code().code() == "XX000" && d.message().contains("concurrently"))
}

/// Attempts of one create or drop when it collides with a concurrent GRANT/REVOKE.
const CONCURRENT_RETRIES: usize = 8;

/// `"name"` with embedded quotes doubled (PostgreSQL identifier quoting).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `'text'` with embedded quotes doubled (standard_conforming_strings is on since 9.1).
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl PostgresIssuer {
    /// Reads the admin connection string from its file and checks it parses. Connecting waits
    /// for first use (the database may be down when the broker starts).
    pub fn new(resource: &str, cfg: &PostgresConfig) -> Result<Self> {
        let raw = Zeroizing::new(std::fs::read_to_string(&cfg.admin_dsn_file).map_err(|e| {
            Error::Config(format!(
                "[resources.{resource}.postgres] admin_dsn_file {}: {e}",
                cfg.admin_dsn_file.display()
            ))
        })?);
        let dsn = Zeroizing::new(raw.trim().to_owned());
        let parsed: tokio_postgres::Config = dsn.parse().map_err(|e| {
            Error::Config(format!(
                "[resources.{resource}.postgres] admin_dsn_file {}: not a PostgreSQL connection \
                 string: {e}",
                cfg.admin_dsn_file.display()
            ))
        })?;
        let dsn_host = parsed.get_hosts().iter().find_map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => Some(h.clone()),
            #[allow(
                unreachable_patterns,
                reason = "the host enum has a Unix-socket variant on Unix only"
            )]
            _ => None,
        });
        let host = cfg
            .host
            .clone()
            .or(dsn_host)
            .unwrap_or_else(|| "localhost".into());
        let port = cfg
            .port
            .or_else(|| parsed.get_ports().first().copied())
            .unwrap_or(5432);
        let database = cfg
            .database
            .clone()
            .or_else(|| parsed.get_dbname().map(str::to_owned))
            .unwrap_or_else(|| "postgres".into());
        let tls = match &cfg.ca_file {
            Some(ca) => Some(tls_connector(
                &format!("[resources.{resource}.postgres]"),
                ca,
            )?),
            None => {
                // Fail closed: the admin password and every role's verifier would cross the
                // network in plaintext.
                if !only_loopback(&parsed) {
                    return Err(Error::Config(format!(
                        "[resources.{resource}.postgres] the admin connection goes to a host that \
                         is not loopback: set ca_file (the CA of the server's certificate) so \
                         that it uses verified TLS"
                    )));
                }
                None
            }
        };
        Ok(Self {
            resource: resource.to_owned(),
            dsn,
            prefix: cfg.role_prefix.clone(),
            host,
            port,
            database,
            grants: cfg.grants.clone(),
            tls,
            // Admin sessions: creations and drops run in parallel up to `pool_size` (default 8).
            pool: (0..cfg.pool_size.max(1))
                .map(|_| Mutex::new(None))
                .collect(),
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Runs `f` on one of the admin sessions, connecting first if needed. A failed call drops the
    /// session so that the next one reconnects.
    async fn with_client<T>(
        &self,
        what: &str,
        f: impl for<'c> Fn(
            &'c mut tokio_postgres::Client,
        ) -> BoxFuture<'c, std::result::Result<T, tokio_postgres::Error>>,
    ) -> Result<T> {
        // Round robin over the sessions; a busy one is waited for (each is one connection).
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.pool.len();
        let mut guard = self.pool[i].lock().await;
        let mut attempt = 0;
        let mut reconnected = false;
        loop {
            if guard.as_ref().is_none_or(|c| c.is_closed()) {
                *guard = Some(self.connect().await?);
                reconnected = true;
            }
            let Some(client) = guard.as_mut() else {
                return Err(upstream_err(&self.resource, what, "no session"));
            };
            match f(client).await {
                Ok(v) => return Ok(v),
                Err(e) if is_concurrent_update(&e) && attempt + 1 < CONCURRENT_RETRIES => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(2 * attempt as u64)).await;
                }
                // A session that broke while idle (the server restarted): once more on a new
                // one. Every operation here is one transaction or idempotent.
                Err(e) if e.as_db_error().is_none() && !reconnected => {
                    *guard = None;
                }
                Err(e) => {
                    if e.as_db_error().is_none() || client.is_closed() {
                        *guard = None;
                    }
                    return Err(upstream_err(&self.resource, what, pg_err(&e)));
                }
            }
        }
    }

    /// Opens an admin session (verified TLS when a CA is configured).
    async fn connect(&self) -> Result<tokio_postgres::Client> {
        let mut cfg: tokio_postgres::Config = self
            .dsn
            .parse()
            .map_err(|e| upstream_err(&self.resource, "connection string", e))?;
        cfg.connect_timeout(CONNECT_TIMEOUT);
        let resource = self.resource.clone();
        let ended = move |e: tokio_postgres::Error| {
            tracing::warn!(resource = %resource, error = %e, "PostgreSQL admin session ended");
        };
        let connect_err = |e: tokio_postgres::Error| {
            upstream_err(
                &self.resource,
                "connect",
                format!("{e}: {}", source_chain(&e)),
            )
        };
        Ok(match &self.tls {
            Some(tls) => {
                cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
                let (client, conn) = cfg.connect(tls.clone()).await.map_err(connect_err)?;
                tokio::spawn(async move { conn.await.unwrap_or_else(ended) });
                client
            }
            None => {
                let (client, conn) = cfg
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(connect_err)?;
                tokio::spawn(async move { conn.await.unwrap_or_else(ended) });
                client
            }
        })
    }

    fn create_sql(
        &self,
        name: &str,
        verifier: &str,
        action: &str,
        expires_at: UnixMillis,
    ) -> Result<Vec<String>> {
        let until = time::OffsetDateTime::from_unix_timestamp(expires_at.div_euclid(1000))
            .map_err(|e| Error::Internal(format!("expiry {expires_at}: {e}")))?;
        let until = format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}+00",
            until.year(),
            u8::from(until.month()),
            until.day(),
            until.hour(),
            until.minute(),
            until.second()
        );
        let role = quote_ident(name);
        let mut sql = vec![
            format!(
                "CREATE ROLE {role} LOGIN NOINHERIT PASSWORD {} VALID UNTIL {}",
                quote_literal(verifier),
                quote_literal(&until)
            ),
            // The admin becomes a member of the role it made, so that revocation may end the
            // role's sessions and drop what it owns without superuser.
            format!("GRANT {role} TO CURRENT_USER"),
        ];
        if let Some(g) = self.grants.get(action) {
            if !g.roles.is_empty() {
                // Group privileges apply through SET ROLE-free inheritance only with INHERIT.
                sql[0] = sql[0].replace(" NOINHERIT ", " INHERIT ");
            }
            for group in &g.roles {
                sql.push(format!("GRANT {} TO {role}", quote_ident(group)));
            }
            for st in &g.statements {
                sql.push(st.replace("{role}", &role));
            }
        }
        Ok(sql)
    }
}

/// A SCRAM-SHA-256 verifier for `password` (what `CREATE ROLE … PASSWORD` stores).
pub fn scram_verifier(password: &[u8]) -> String {
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    scram_verifier_with(password, &salt, SCRAM_ITERATIONS)
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

fn scram_verifier_with(password: &[u8], salt: &[u8], iterations: u32) -> String {
    // PBKDF2-HMAC-SHA256 with one output block (RFC 8018 §5.2).
    let mut first = salt.to_vec();
    first.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &first);
    let mut salted = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (s, b) in salted.iter_mut().zip(u.iter()) {
            *s ^= b;
        }
    }
    let client_key = hmac(&salted, b"Client Key");
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&salted, b"Server Key");
    salted.zeroize();
    u.zeroize();
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key),
        STANDARD.encode(server_key)
    )
}

impl Upstream for PostgresIssuer {
    fn prefix(&self) -> &str {
        &self.prefix
    }

    fn create<'a>(
        &'a self,
        name: &'a str,
        action: &'a str,
        expires_at: UnixMillis,
    ) -> BoxFuture<'a, Result<Issued>> {
        Box::pin(async move {
            let mut raw = [0u8; 24];
            rand::rngs::OsRng.fill_bytes(&mut raw);
            let password = Zeroizing::new(URL_SAFE_NO_PAD.encode(raw));
            raw.zeroize();
            let verifier = scram_verifier(password.as_bytes());
            let sql = self.create_sql(name, &verifier, action, expires_at)?;
            self.with_client("create role", |c| {
                let sql = sql.clone();
                Box::pin(async move {
                    let tx = c.transaction().await?;
                    for s in &sql {
                        tx.batch_execute(s).await?;
                    }
                    tx.commit().await
                })
            })
            .await?;
            let dsn = format!(
                "postgresql://{name}:{}@{}:{}/{}",
                password.as_str(),
                if self.host.contains(':') {
                    format!("[{}]", self.host)
                } else {
                    self.host.clone()
                },
                self.port,
                self.database
            );
            let attributes = [
                ("user".to_owned(), name.to_owned()),
                ("host".to_owned(), self.host.clone()),
                ("port".to_owned(), self.port.to_string()),
                ("database".to_owned(), self.database.clone()),
            ]
            .into();
            Ok(Issued {
                secret: Secret::new(dsn),
                attributes,
            })
        })
    }

    fn revoke<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let role = quote_ident(name);
            let name = name.to_owned();
            self.with_client("drop role", |c| {
                let (role, name) = (role.clone(), name.clone());
                Box::pin(async move {
                    let exists = c
                        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
                        .await?
                        .is_some();
                    if !exists {
                        return Ok(());
                    }
                    // A role made before the admin joined its roles (or by a broker of an
                    // earlier version): join it now, so that terminating and DROP OWNED work.
                    c.batch_execute(&format!(
                        "DO $$ BEGIN IF NOT pg_has_role(current_user, {lit}, 'USAGE') THEN \
                         EXECUTE 'GRANT ' || quote_ident({lit}) || ' TO CURRENT_USER'; \
                         END IF; END $$",
                        lit = quote_literal(&name)
                    ))
                    .await?;
                    // No new sessions, then end the open ones, then drop.
                    c.batch_execute(&format!("ALTER ROLE {role} NOLOGIN"))
                        .await?;
                    c.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                        &[&name],
                    )
                    .await?;
                    crate::failpoint::hit("revoke-after-terminate");
                    let tx = c.transaction().await?;
                    tx.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}"))
                        .await?;
                    tx.commit().await
                })
            })
            .await
        })
    }

    fn preflight(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let groups: Vec<String> = self
                .grants
                .values()
                .flat_map(|g| g.roles.iter().cloned())
                .collect();
            let facts = self
                .with_client("check the admin's privileges", |c| {
                    let groups = groups.clone();
                    Box::pin(async move {
                        let me = c
                            .query_one(
                                "SELECT current_user::text, rolsuper, rolcreaterole, \
                                 current_setting('server_version_num')::int \
                                 FROM pg_roles WHERE rolname = current_user",
                                &[],
                            )
                            .await?;
                        let mut missing = Vec::new();
                        for g in &groups {
                            let row = c
                                .query_one(
                                    "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1), \
                                     EXISTS (SELECT 1 FROM pg_auth_members m \
                                       JOIN pg_roles r ON r.oid = m.roleid \
                                       JOIN pg_roles u ON u.oid = m.member \
                                       WHERE r.rolname = $1 AND u.rolname = current_user \
                                       AND m.admin_option)",
                                    &[g],
                                )
                                .await?;
                            missing.push((g.clone(), row.get::<_, bool>(0), row.get::<_, bool>(1)));
                        }
                        Ok((
                            me.get::<_, String>(0),
                            me.get::<_, bool>(1),
                            me.get::<_, bool>(2),
                            me.get::<_, i32>(3),
                            missing,
                        ))
                    })
                })
                .await?;
            let (admin, superuser, createrole, version, groups) = facts;
            if superuser {
                return Ok(());
            }
            let admin_q = quote_ident(&admin);
            let mut fixes = Vec::new();
            if !createrole {
                fixes.push(format!("ALTER ROLE {admin_q} CREATEROLE;"));
            }
            for (g, exists, admin_option) in groups {
                if !exists {
                    fixes.push(format!(
                        "CREATE ROLE {} NOLOGIN; -- the group role of a grant does not exist",
                        quote_ident(&g)
                    ));
                } else if version >= 160_000 && !admin_option {
                    fixes.push(format!(
                        "GRANT {} TO {admin_q} WITH ADMIN OPTION;",
                        quote_ident(&g)
                    ));
                }
            }
            if fixes.is_empty() {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "[resources.{}.postgres] the admin role {admin} cannot issue and revoke \
                     credentials; as a superuser, run: {} (and grant it, WITH GRANT OPTION, what \
                     the GRANT statements hand out)",
                    self.resource,
                    fixes.join(" ")
                )))
            }
        })
    }

    fn list<'a>(&'a self) -> BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(async move {
            let prefix = self.prefix.clone();
            self.with_client("list roles", |c| {
                let prefix = prefix.clone();
                Box::pin(async move {
                    let rows = c
                        .query(
                            "SELECT rolname FROM pg_roles WHERE starts_with(rolname, $1) ORDER BY 1",
                            &[&prefix],
                        )
                        .await?;
                    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
                })
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scram_verifier_matches_rfc7677_vector() {
        // RFC 7677 §3: password "pencil", salt W22ZaJ0SNY7soEsUEjb6gQ==, 4096 iterations.
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = scram_verifier_with(b"pencil", &salt, 4096);
        // StoredKey and ServerKey as Python's hashlib.pbkdf2_hmac + hmac compute them.
        assert_eq!(
            v,
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$\
             WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:\
             wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
    }

    #[test]
    fn a_remote_admin_connection_without_a_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dsn = dir.path().join("dsn");
        let cfg = |host: &str, ca: Option<std::path::PathBuf>| {
            std::fs::write(&dsn, format!("host={host} user=a password=b dbname=c")).unwrap();
            PostgresConfig {
                admin_dsn_file: dsn.clone(),
                role_prefix: "jb_".into(),
                host: None,
                port: None,
                database: None,
                grants: Default::default(),
                ca_file: ca,
                pool_size: 8,
            }
        };
        let e = PostgresIssuer::new("db", &cfg("db.example.com", None)).unwrap_err();
        assert!(e.to_string().contains("ca_file"), "{e}");
        PostgresIssuer::new("db", &cfg("127.0.0.1", None)).expect("loopback is fine");
        PostgresIssuer::new("db", &cfg("localhost", None)).expect("loopback is fine");
        let e = PostgresIssuer::new("db", &cfg("localhost hostaddr=10.1.2.3", None)).unwrap_err();
        assert!(e.to_string().contains("ca_file"), "hostaddr decides: {e}");
        PostgresIssuer::new("db", &cfg("localhost hostaddr=127.0.0.1", None))
            .expect("loopback hostaddr is fine");
        let missing = dir.path().join("no-such-ca.pem");
        let e = PostgresIssuer::new("db", &cfg("db.example.com", Some(missing))).unwrap_err();
        assert!(e.to_string().contains("no-such-ca.pem"), "{e}");
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
