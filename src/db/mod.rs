//! Database connection and write transactions.
//!
//! SQLite specifics live here and nowhere else: connection pragmas, and a process-wide write
//! lock so that writers queue in memory instead of spinning in SQLite's busy handler.

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

#[derive(Clone)]
pub struct Db {
    conn: DatabaseConnection,
    /// `Some` on SQLite, which has a single writer.
    write_lock: Option<Arc<Mutex<()>>>,
}

impl Db {
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, DbErr> {
        let sqlite = url.starts_with("sqlite:");
        let mut options = ConnectOptions::new(url.to_owned());
        options
            .max_connections(max_connections.max(if sqlite { 2 } else { 1 }))
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .sqlx_logging(false);
        if sqlite {
            // FULL: a commit is on disk before the device is told it is.
            options.map_sqlx_sqlite_opts(|o| {
                o.journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(10))
                    .foreign_keys(true)
                    .create_if_missing(true)
                    .pragma("cache_size", "-32768")
                    .pragma("mmap_size", "268435456")
                    .pragma("temp_store", "memory")
            });
        }
        let conn = Database::connect(options).await?;
        Ok(Db {
            conn,
            write_lock: sqlite.then(|| Arc::new(Mutex::new(()))),
        })
    }

    pub fn conn(&self) -> &DatabaseConnection {
        &self.conn
    }

    /// Starts a transaction that will write. On SQLite it takes the write lock first and
    /// begins `IMMEDIATE`, so it never fails half-way on a lock upgrade.
    pub async fn begin_write(&self) -> Result<WriteTxn, DbErr> {
        let guard = match &self.write_lock {
            Some(lock) => Some(lock.clone().lock_owned().await),
            None => None,
        };
        let txn = self
            .conn
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?;
        Ok(WriteTxn { txn, _guard: guard })
    }

    pub async fn ping(&self) -> Result<(), DbErr> {
        self.conn.execute_unprepared("SELECT 1").await.map(|_| ())
    }

    pub async fn close(self) -> Result<(), DbErr> {
        self.conn.close().await
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
