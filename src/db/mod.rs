//! Database connection and write transactions.
//!
//! SQLite specifics live here and nowhere else: connection pragmas, one dedicated writer
//! connection (its page cache stays warm, and writers queue in memory instead of spinning in
//! SQLite's busy handler), and WAL checkpoints run off the writer's path.

pub mod entities;

use std::{sync::Arc, time::Duration};

use sea_orm::{
    sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous},
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbErr,
    SqliteTransactionMode, TransactionOptions, TransactionTrait,
};
use tokio::sync::{Mutex, OwnedMutexGuard};

/// An `IN (…)` list padded to a power-of-two length by repeating its last id: the same few
/// statement shapes recur, so prepared statements are reused instead of prepared per call.
pub fn padded_ids(ids: &[i32]) -> Vec<i32> {
    let mut list = ids.to_vec();
    if let Some(&last) = list.last() {
        list.resize(list.len().next_power_of_two(), last);
    }
    list
}

/// The `n`-th (1-based) bind placeholder of a hand-written statement: `?` on SQLite, `$n` on
/// PostgreSQL.
pub fn placeholder(backend: sea_orm::DbBackend, n: usize) -> String {
    match backend {
        sea_orm::DbBackend::Postgres => format!("${n}"),
        _ => "?".to_owned(),
    }
}

/// [`Db::statement_bytes`] for a server reached over the network (or with TLS).
pub const NETWORK_STATEMENT_BYTES: usize = 12 * 1024;
/// [`Db::statement_bytes`] for a server on this machine reached without TLS.
pub const LOOPBACK_STATEMENT_BYTES: usize = 256 * 1024;

/// Whether a PostgreSQL URL leaves TLS unchosen (no `sslmode`, no `PGSSLMODE`) and names a
/// server on this machine: then it is reached without TLS.
fn plain_loopback(url: &str) -> bool {
    use std::str::FromStr;
    if std::env::var_os("PGSSLMODE").is_some() {
        return false;
    }
    let query = url.split_once('?').map_or("", |(_, q)| q);
    if query
        .split('&')
        .any(|pair| matches!(pair.split('=').next(), Some("sslmode" | "ssl-mode")))
    {
        return false;
    }
    let Ok(options) = sea_orm::sqlx::postgres::PgConnectOptions::from_str(url) else {
        return false;
    };
    let host = options.get_host();
    host == "localhost"
        || host.starts_with('/')
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// SQLite connections for bulk reads: exports running at the same time take turns page by
/// page beyond this.
const BULK_CONNECTIONS: u32 = 2;

/// How to connect; the PostgreSQL parts matter in production (see the README).
#[derive(Debug, Clone)]
pub struct DbOptions {
    pub max_connections: u32,
    /// Waiting longer than this for a connection (or to open one) is an error.
    pub connect_timeout: Duration,
    /// PostgreSQL: a statement running longer than this is cancelled by the server.
    pub statement_timeout: Duration,
    /// PostgreSQL: how the connections are named in `pg_stat_activity`.
    pub application_name: String,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            max_connections: 8,
            connect_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
            application_name: "ozone".into(),
        }
    }
}

/// The file of a `sqlite:` URL (`None` for in-memory databases and other backends).
pub fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" || query.contains("mode=memory") {
        return None;
    }
    Some(path.into())
}

#[derive(Clone)]
pub struct Db {
    /// Readers (and, on PostgreSQL, writers too).
    conn: DatabaseConnection,
    /// Where write transactions run: on SQLite a pool of exactly one connection.
    writer: DatabaseConnection,
    /// Long sequential reads (exports): on SQLite connections of their own with a small page
    /// cache, so that reading millions of rows once neither grows the process by a full cache
    /// nor evicts what the readers keep cached. The readers on PostgreSQL.
    bulk: DatabaseConnection,
    /// `Some` on SQLite, which has a single writer.
    write_lock: Option<Arc<Mutex<()>>>,
    /// Most bytes of parameters one statement should carry (see [`Db::statement_bytes`]).
    statement_bytes: usize,
    /// PostgreSQL: how to open another pool (see [`Db::with_own_writer`]).
    reopen: Option<Arc<ConnectOptions>>,
    /// Whether `writer` is a pool of its own (see [`Db::with_own_writer`]).
    own_writer: bool,
}

impl Db {
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, DbErr> {
        Db::connect_with(
            url,
            &DbOptions {
                max_connections,
                ..DbOptions::default()
            },
        )
        .await
    }

    /// Opens the pools. TLS to PostgreSQL is chosen in the URL (`sslmode=require` or
    /// `verify-full` with `sslrootcert=…`; rustls, no OpenSSL). A URL that does not choose
    /// (no `sslmode`, no `PGSSLMODE`) reaches a server on this machine (`localhost`, a loopback
    /// address, a Unix socket) without TLS, which protects nothing there and costs ingest about
    /// a tenth of its speed, and any other server with TLS if it offers it (`prefer`).
    pub async fn connect_with(url: &str, db: &DbOptions) -> Result<Db, DbErr> {
        let max_connections = db.max_connections;
        if !url.starts_with("sqlite:") {
            let plain = plain_loopback(url);
            let mut options = ConnectOptions::new(url.to_owned());
            let statement_timeout = format!("{}ms", db.statement_timeout.as_millis());
            let application_name = db.application_name.clone();
            options
                .max_connections(max_connections.max(1))
                .min_connections(1)
                .connect_timeout(db.connect_timeout)
                .acquire_timeout(db.connect_timeout)
                .sqlx_logging(false)
                .map_sqlx_postgres_opts(move |o| {
                    let o = o
                        .application_name(&application_name)
                        .options([("statement_timeout", statement_timeout.as_str())]);
                    if plain {
                        o.ssl_mode(sea_orm::sqlx::postgres::PgSslMode::Disable)
                    } else {
                        o
                    }
                });
            let conn = Database::connect(options.clone()).await?;
            return Ok(Db {
                reopen: Some(Arc::new(options)),
                own_writer: false,
                writer: conn.clone(),
                bulk: conn.clone(),
                conn,
                write_lock: None,
                statement_bytes: if plain {
                    LOOPBACK_STATEMENT_BYTES
                } else {
                    NETWORK_STATEMENT_BYTES
                },
            });
        }
        let sqlite = |connections: u32, cache_size: &'static str| {
            let mut options = ConnectOptions::new(url.to_owned());
            options
                .max_connections(connections)
                .min_connections(1)
                .acquire_timeout(db.connect_timeout)
                .sqlx_logging(false)
                // A local file needs no liveness ping before every use.
                .test_before_acquire(false)
                // FULL: a commit is on disk before the device is told it is.
                .map_sqlx_sqlite_opts(move |o| {
                    o.journal_mode(SqliteJournalMode::Wal)
                        .synchronous(SqliteSynchronous::Full)
                        .busy_timeout(Duration::from_secs(10))
                        .foreign_keys(true)
                        .create_if_missing(true)
                        .pragma("cache_size", cache_size)
                        .pragma("temp_store", "memory")
                        .pragma("wal_autocheckpoint", "10000")
                });
            options
        };
        // The writer first: it creates the file and switches it to WAL.
        // Page caches in KiB (negative): 32 MiB for the writer and each reader, 2 MiB for bulk
        // reads, which touch each page once.
        let writer = Database::connect(sqlite(1, "-32768")).await?;
        let conn = Database::connect(sqlite(max_connections.max(1), "-32768")).await?;
        let bulk = Database::connect(sqlite(BULK_CONNECTIONS, "-2048")).await?;
        Ok(Db {
            conn,
            writer,
            bulk,
            write_lock: Some(Arc::new(Mutex::new(()))),
            statement_bytes: LOOPBACK_STATEMENT_BYTES,
            reopen: None,
            own_writer: false,
        })
    }

    /// This database with write transactions on a pool of `connections` opened from the
    /// calling runtime (PostgreSQL; SQLite keeps its one writer connection). A socket is
    /// watched by the runtime that opened it: a task on another runtime (the event writer has
    /// one of its own) learns that its reply has arrived only when that runtime's busy workers
    /// next poll for I/O, which adds latency to every statement.
    pub async fn with_own_writer(&self, connections: u32) -> Result<Db, DbErr> {
        let Some(reopen) = &self.reopen else {
            return Ok(self.clone());
        };
        let mut options = ConnectOptions::clone(reopen);
        options
            .max_connections(connections.max(1))
            .min_connections(0);
        Ok(Db {
            writer: Database::connect(options).await?,
            own_writer: true,
            ..self.clone()
        })
    }

    /// Copies the WAL back into the database file without blocking the writer, so that
    /// commits rarely pay for a checkpoint themselves. A no-op on PostgreSQL.
    pub async fn checkpoint(&self) -> Result<(), DbErr> {
        if self.write_lock.is_some() {
            self.conn
                .execute_unprepared("PRAGMA wal_checkpoint(PASSIVE)")
                .await?;
        }
        Ok(())
    }

    pub fn conn(&self) -> &DatabaseConnection {
        &self.conn
    }

    /// Where long sequential reads such as exports run (see the `bulk` field).
    pub fn bulk_conn(&self) -> &DatabaseConnection {
        &self.bulk
    }

    /// Most bytes of parameters one statement should carry. sqlx leaves Nagle's algorithm on:
    /// over TLS, which cuts records at 16 KiB, a message written in two pieces waits some
    /// 40 ms for the server's delayed ACK before its tail leaves (measured: ingest fell to
    /// 635 events/s with 60 KiB statements), so statements to a networked server stay within
    /// one record. Without TLS on this machine a message leaves in one write.
    pub fn statement_bytes(&self) -> usize {
        self.statement_bytes
    }

    /// Starts a transaction that will write. On SQLite it takes the write lock first and
    /// begins `IMMEDIATE`, so it never fails half-way on a lock upgrade.
    pub async fn begin_write(&self) -> Result<WriteTxn, DbErr> {
        let guard = match &self.write_lock {
            Some(lock) => Some(lock.clone().lock_owned().await),
            None => None,
        };
        let txn = self
            .writer
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?;
        Ok(WriteTxn { txn, _guard: guard })
    }

    /// Reader pool connections in use and idle (for metrics).
    pub fn pool_usage(&self) -> (u32, u32) {
        let (size, idle) = match self.conn.get_database_backend() {
            sea_orm::DbBackend::Sqlite => {
                let pool = self.conn.get_sqlite_connection_pool();
                (pool.size(), pool.num_idle())
            }
            _ => {
                let pool = self.conn.get_postgres_connection_pool();
                (pool.size(), pool.num_idle())
            }
        };
        let idle = u32::try_from(idle).unwrap_or(u32::MAX);
        (size.saturating_sub(idle), idle)
    }

    pub fn is_sqlite(&self) -> bool {
        self.write_lock.is_some()
    }

    /// Writes a consistent copy of a SQLite database to `path` with `VACUUM INTO`: it reads
    /// one snapshot, so it is safe while the server runs, and WAL writers are not blocked.
    pub async fn backup_sqlite(&self, path: &std::path::Path) -> Result<(), DbErr> {
        let path = path
            .to_str()
            .ok_or_else(|| DbErr::Custom("the backup path is not valid UTF-8".into()))?;
        self.conn
            .execute_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DbBackend::Sqlite,
                "VACUUM INTO ?",
                [path.into()],
            ))
            .await
            .map(|_| ())
    }

    pub async fn ping(&self) -> Result<(), DbErr> {
        self.conn.execute_unprepared("SELECT 1").await.map(|_| ())
    }

    /// Closes the pool of [`Db::with_own_writer`] (a no-op for a `Db` sharing its writer).
    pub async fn close_own_writer(&self) {
        if self.own_writer {
            let _ = self.writer.close_by_ref().await;
        }
    }

    pub async fn close(self) -> Result<(), DbErr> {
        self.conn.close().await?;
        if self.write_lock.is_some() {
            self.writer.close().await?;
            self.bulk.close().await?;
        }
        Ok(())
    }
}

/// A write transaction; holds the SQLite write lock until committed or dropped.
pub struct WriteTxn {
    txn: DatabaseTransaction,
    _guard: Option<OwnedMutexGuard<()>>,
}

impl WriteTxn {
    pub async fn commit(self) -> Result<(), DbErr> {
        self.txn.commit().await
    }
}

impl std::ops::Deref for WriteTxn {
    type Target = DatabaseTransaction;
    fn deref(&self) -> &DatabaseTransaction {
        &self.txn
    }
}

#[cfg(test)]
mod tests {
    use super::plain_loopback;

    #[test]
    fn loopback_servers_are_reached_without_tls_unless_the_url_chooses() {
        if std::env::var_os("PGSSLMODE").is_some() {
            return;
        }
        for url in [
            "postgres://u:p@127.0.0.1:5432/db",
            "postgres://u:p@localhost/db",
            "postgres://u:p@[::1]:5432/db?application_name=x",
            "postgres:///db?host=/var/run/postgresql",
        ] {
            assert!(plain_loopback(url), "{url}");
        }
        for url in [
            "postgres://u:p@127.0.0.1:5432/db?sslmode=prefer",
            "postgres://u:p@localhost/db?application_name=x&sslmode=require",
            "postgres://u:p@db.example.com/db",
            "postgres://u:p@10.0.0.5/db",
        ] {
            assert!(!plain_loopback(url), "{url}");
        }
    }
}
