//! A throwaway PostgreSQL server for tests: `initdb` into a temp dir, TCP on 127.0.0.1 and a free
//! port only (no unix socket), password authentication (SCRAM) for every TCP login, stopped when
//! dropped. PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user
//! (created by the Debian package) through `runuser`.
//!
//! Binaries: `$JITBROKER_PG_BIN`, else `pg_config --bindir`, else /usr/lib/postgresql/*/bin.
//! Missing binaries skip the test unless `JITBROKER_REQUIRE_POSTGRES=1` (set by scripts/test.sh,
//! which installs PostgreSQL from the OS packages when it is absent).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::free_port;

pub const ADMIN: &str = "jbadmin";

pub struct Pg {
    pub port: u16,
    pub password: String,
    /// PEM of the CA that signed the server's TLS certificate (TLS is on; plaintext logins are
    /// accepted too, so tests choose).
    pub ca_pem: String,
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_root: bool,
}

fn find_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("JITBROKER_PG_BIN") {
        return Some(PathBuf::from(p));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return Some(p);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

/// Hands a directory to the `postgres` user (the server runs as it when the tests run as root).
fn give_to_postgres(dir: &Path) {
    let ok = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .status()
        .unwrap()
        .success();
    assert!(ok, "chown of {} to the postgres user", dir.display());
}

/// A CA and a server certificate for 127.0.0.1 / localhost signed by it: (CA, cert, key) PEM.
fn server_tls() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "test PostgreSQL CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    p.subject_alt_names
        .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = p.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

impl Pg {
    /// Starts a server, or returns None (test skipped) when PostgreSQL is not installed.
    pub fn start() -> Option<Pg> {
        let required = std::env::var("JITBROKER_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
        let Some(bin) = find_bin() else {
            assert!(
                !required,
                "PostgreSQL is required but not installed (apt-get install postgresql)"
            );
            eprintln!("SKIP: PostgreSQL not installed");
            return None;
        };
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let dir = tempfile::tempdir().unwrap();
        let password = hex::encode(rand::random::<[u8; 16]>());
        std::fs::write(dir.path().join("pw"), &password).unwrap();
        if as_root {
            give_to_postgres(dir.path());
        }
        let (ca_pem, cert_pem, key_pem) = server_tls();
        let pg = Pg {
            port: free_port(),
            password,
            ca_pem,
            dir,
            bin,
            as_root,
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                &data.display().to_string(),
                "-U",
                ADMIN,
                &format!("--pwfile={}", pg.dir.path().join("pw").display()),
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        std::fs::write(data.join("server.crt"), cert_pem).unwrap();
        std::fs::write(data.join("server.key"), key_pem).unwrap();
        if as_root {
            for f in ["server.crt", "server.key"] {
                Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(data.join(f))
                    .status()
                    .unwrap();
            }
        }
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
        }
        // fsync off is safe here: a commit still reaches the OS before the client hears of it, so
        // `stop_server` (an immediate stop, as in an outage) loses nothing. synchronous_commit
        // must stay on: off, a commit sits in shared WAL buffers for up to 3 x wal_writer_delay,
        // and an immediate stop right after `seed` would lose the test tables.
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = ''\n\
             fsync = off\nfull_page_writes = off\n\
             password_encryption = 'scram-sha-256'\nmax_connections = 100\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            pg.port
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        text.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), text).unwrap();
        pg.start_server();
        Some(pg)
    }

    /// A streaming standby of this server (`pg_basebackup -R`), on a port of its own, named
    /// `name` (its `application_name`, for `synchronous_standby_names`), started.
    pub fn start_standby(&self, name: &str) -> Pg {
        let dir = tempfile::tempdir().unwrap();
        if self.as_root {
            give_to_postgres(dir.path());
        }
        let standby = Pg {
            port: free_port(),
            password: self.password.clone(),
            ca_pem: self.ca_pem.clone(),
            dir,
            bin: self.bin.clone(),
            as_root: self.as_root,
        };
        let conninfo = format!(
            "host=127.0.0.1 port={} user={ADMIN} password={} application_name={name}",
            self.port, self.password
        );
        standby.run(
            "pg_basebackup",
            &[
                "-D",
                &standby.data().display().to_string(),
                "-d",
                &conninfo,
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ],
        );
        let auto = standby.data().join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
        text.push_str(&format!(
            "\nport = {}\nprimary_conninfo = '{conninfo}'\n",
            standby.port
        ));
        std::fs::write(&auto, text).unwrap();
        standby.start_server();
        standby
    }

    /// Makes commits on this server wait for the standby named `name`.
    pub async fn require_sync_standby(&self, name: &str) {
        let c = self.admin().await;
        // One statement per call: ALTER SYSTEM refuses to run in the implicit transaction of a
        // multi-statement query.
        c.batch_execute(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{name}'"
        ))
        .await
        .unwrap();
        c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    }

    /// Promotes this standby to primary (waits until it accepts writes).
    pub fn promote(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.data().display().to_string(), "-w", "promote"],
        );
    }

    /// The server's data directory (its files, for tests that read what is on disk).
    pub fn data_dir(&self) -> PathBuf {
        self.data()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn start_server(&self) {
        let log = self.dir.path().join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-l",
                &log.display().to_string(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops the server at once (sessions are cut, as in a crash or an outage).
    pub fn stop_server(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    pub fn admin_dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={ADMIN} password={} dbname=postgres",
            self.port, self.password
        )
    }

    /// Writes the admin connection string to `dir/pg-admin.dsn` and returns its path.
    pub fn write_admin_dsn(&self, dir: &Path) -> PathBuf {
        let p = dir.join("pg-admin.dsn");
        std::fs::write(&p, self.admin_dsn()).unwrap();
        p
    }

    pub async fn connect(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    pub async fn admin(&self) -> tokio_postgres::Client {
        Self::connect(&self.admin_dsn()).await.expect("admin login")
    }

    /// Login roles whose name starts with `prefix`.
    pub async fn roles(&self, prefix: &str) -> Vec<String> {
        let c = self.admin().await;
        let rows = c
            .query(
                "SELECT rolname FROM pg_roles WHERE starts_with(rolname, $1) ORDER BY 1",
                &[&prefix],
            )
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let exe = self.bin.join("pg_ctl");
        let data = self.data().display().to_string();
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let _ = cmd
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}
