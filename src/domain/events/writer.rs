//! The group-commit writer: events queued while a commit is in flight share the next
//! transaction, and each is acknowledged only after that commit. Contacts without an event
//! (polls, connections) ride along: they are recorded with the next commit, or within
//! [`CONTACT_DELAY`] when no event comes, never with a transaction of their own per request.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement, Value};
use tokio::sync::{mpsc, oneshot, Notify};

use super::{NewEvent, Treatment};
use crate::{
    db::{placeholder, Db, WriteTxn},
    domain::{
        fleet::{Attribution, AttributionCache},
        notify::{Notification, Notifier},
        rollup,
        status::{self, Stamp},
    },
    error::{Error, Result},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    Stored,
    Duplicate,
}

struct Job {
    event: NewEvent,
    done: oneshot::Sender<Result<Ingested>>,
}

/// A contact that carries no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contact {
    /// An HTTP command poll: sets `last_poll`.
    Poll,
    /// Any other sign of life: sets `last_seen`.
    Seen,
}

/// How long a contact may wait for an event commit to ride along with.
pub const CONTACT_DELAY: Duration = Duration::from_millis(100);

type Contacts = Arc<Mutex<HashMap<i32, status::DeviceUpdate>>>;

/// Hands events to the group-commit writer.
#[derive(Clone)]
pub struct Ingestor {
    db: Db,
    notifier: Notifier,
    tx: mpsc::Sender<Job>,
    stop: Arc<Notify>,
    contacts: Contacts,
    contact_ready: Arc<Notify>,
}

impl Ingestor {
    /// Starts the writer. At most `batch_max` events share a transaction; a batch is whatever
    /// queued while the previous commit was in flight, so an idle server commits each event at
    /// once and a busy one amortises the fsync.
    pub fn start(
        db: Db,
        batch_max: usize,
        notifier: Notifier,
    ) -> (Ingestor, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(batch_max.max(1) * 8);
        let stop = Arc::new(Notify::new());
        let contacts: Contacts = Arc::default();
        let contact_ready = Arc::new(Notify::new());
        let writer = run_writer(
            db.clone(),
            notifier.clone(),
            rx,
            batch_max.max(1),
            stop.clone(),
            contacts.clone(),
            contact_ready.clone(),
        );
        // The writer gets a thread and runtime of its own: each of its awaits (one per
        // statement) would otherwise queue behind request tasks on a busy runtime, and the
        // commit cycle, which every acknowledgement waits for, would stretch with HTTP load.
        let task =
            tokio::task::spawn_blocking(
                move || match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(writer),
                    Err(err) => tracing::error!(error = %err, "cannot start the event writer"),
                },
            );
        (
            Ingestor {
                db,
                notifier,
                tx,
                stop,
                contacts,
                contact_ready,
            },
            task,
        )
    }

    /// Records a contact without waiting: it is committed with the next batch, within
    /// [`CONTACT_DELAY`] plus one commit, and before the writer stops.
    pub fn touch(&self, device: i32, contact: Contact, at: DateTime<Utc>) {
        let mut contacts = self.contacts.lock().unwrap_or_else(|e| e.into_inner());
        let first = contacts.is_empty();
        let update = contacts.entry(device).or_default();
        match contact {
            Contact::Poll => update.polled_at(at),
            Contact::Seen => update.seen_at(at),
        }
        drop(contacts);
        if first {
            self.contact_ready.notify_one();
        }
    }

    /// Resolves once the event is durably stored (or known to be a duplicate).
    pub async fn submit(&self, event: NewEvent) -> Result<Ingested> {
        let (done, outcome) = oneshot::channel();
        self.tx
            .send(Job { event, done })
            .await
            .map_err(|_| Error::Unavailable)?;
        outcome.await.map_err(|_| Error::Unavailable)?
    }

    /// Commits the contacts recorded so far now, without waiting for the writer.
    pub async fn flush_contacts(&self) {
        let mut memo = status::DeviceMemo::default();
        commit_contacts(&self.db, &self.notifier, &self.contacts, &mut memo).await;
    }

    /// Stops accepting events; everything already queued is still committed.
    pub fn shutdown(&self) {
        self.stop.notify_one();
    }
}

async fn run_writer(
    db: Db,
    notifier: Notifier,
    mut rx: mpsc::Receiver<Job>,
    batch_max: usize,
    stop: Arc<Notify>,
    contacts: Contacts,
    contact_ready: Arc<Notify>,
) {
    // With a database that takes concurrent writers (PostgreSQL), the next batch is prepared
    // (begun, attributed, its events inserted) while the previous one commits; the rows that
    // batches share (rollups, device status) are written only once the previous commit is
    // done, so batches never wait on each other's row locks and commits keep their order.
    // SQLite has one writer: each batch is whatever queued during the previous commit.
    let pipelined = !db.is_sqlite();
    // Statements on connections opened here, whose replies this runtime sees at once: one
    // for the batch being prepared, one committing, one for contacts or retries.
    let db = match db.with_own_writer(3).await {
        Ok(own) => own,
        Err(err) => {
            tracing::warn!(error = %err, "the event writer shares the server's connections");
            db
        }
    };
    let mut memo = status::DeviceMemo::default();
    // PostgreSQL: the attribution of known devices is kept between batches (SQLite reads it
    // in process, at no comparable cost).
    let mut bindings = pipelined.then(AttributionCache::default);
    let mut in_flight: Option<tokio::task::JoinHandle<Settled>> = None;
    let mut stopping = false;
    loop {
        let first = if stopping {
            rx.recv().await
        } else {
            tokio::select! {
                job = rx.recv() => job,
                _ = contact_ready.notified() => {
                    // Give an event a moment to arrive and carry the contacts along.
                    match tokio::time::timeout(CONTACT_DELAY, rx.recv()).await {
                        Ok(job) => job,
                        Err(_) => {
                            if let Some(failed) = settle(in_flight.take(), &mut memo).await {
                                forget(&mut bindings);
                                retry(failed, &db, &notifier, &contacts, &mut memo).await;
                            }
                            commit_contacts(&db, &notifier, &contacts, &mut memo).await;
                            continue;
                        }
                    }
                }
                _ = stop.notified() => {
                    stopping = true;
                    rx.close();
                    continue;
                }
            }
        };
        let Some(first) = first else { break };
        let mut jobs = vec![first];
        while jobs.len() < batch_max {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let events: Vec<&NewEvent> = jobs.iter().map(|j| &j.event).collect();
        let prepared = prepare_batch(&db, &events, bindings.as_mut()).await;
        let finished = match settle(in_flight.take(), &mut memo).await {
            None => match prepared {
                Ok(batch) => {
                    let touched = take_contacts(&contacts);
                    match batch.finish(&events, touched.clone(), &memo).await {
                        Ok(finished) => Ok((finished, touched)),
                        Err(err) => {
                            restore_contacts(&contacts, touched);
                            Err(err)
                        }
                    }
                }
                Err(err) => Err(err),
            },
            Some(failed) => {
                // This batch's inserts must not hold up the retries: it is rolled back and
                // retried after them.
                drop(prepared);
                forget(&mut bindings);
                retry(failed, &db, &notifier, &contacts, &mut memo).await;
                Err(Error::Unavailable)
            }
        };
        let devices = sent_by(&events);
        drop(events);
        match finished {
            Ok((finished, touched)) => {
                in_flight = Some(tokio::spawn(finished.commit(
                    jobs,
                    devices,
                    touched,
                    started,
                    notifier.clone(),
                )));
                if !pipelined {
                    let failed = settle(in_flight.take(), &mut memo).await;
                    if let Some(failed) = failed {
                        forget(&mut bindings);
                        retry(failed, &db, &notifier, &contacts, &mut memo).await;
                    }
                }
            }
            Err(err) => {
                if !matches!(err, Error::Unavailable) {
                    tracing::warn!(error = %err, size = jobs.len(), "event batch failed; committing individually");
                }
                forget(&mut bindings);
                commit_individually(&db, &notifier, jobs, &mut memo, started).await;
            }
        }
    }
    if let Some(failed) = settle(in_flight.take(), &mut memo).await {
        retry(failed, &db, &notifier, &contacts, &mut memo).await;
    }
    // Contacts that came in last are written before the writer ends.
    commit_contacts(&db, &notifier, &contacts, &mut memo).await;
    db.close_own_writer().await;
}

/// A batch that failed may have failed on what the cache holds (a machine deleted since, say):
/// its retries and the batches after it read the bindings afresh.
fn forget(bindings: &mut Option<AttributionCache>) {
    if let Some(cache) = bindings {
        cache.clear();
    }
}

/// How a batch's commit ended: its status writes for the memo, or its jobs back for retrying.
enum Settled {
    Committed(status::DeviceMemo),
    Failed(Failed),
}

/// A batch whose commit failed.
struct Failed {
    jobs: Vec<Job>,
    touched: HashMap<i32, status::DeviceUpdate>,
    started: std::time::Instant,
}

/// Waits for the batch in flight, if any; hands back a batch that failed to commit.
async fn settle(
    in_flight: Option<tokio::task::JoinHandle<Settled>>,
    memo: &mut status::DeviceMemo,
) -> Option<Failed> {
    match in_flight?.await {
        Ok(Settled::Committed(writes)) => {
            memo.absorb(writes);
            None
        }
        Ok(Settled::Failed(failed)) => Some(failed),
        Err(err) => {
            // The commit task panicked: its events are unacknowledged (their senders see the
            // writer as unavailable and resend).
            tracing::error!(error = %err, "event commit task failed");
            None
        }
    }
}

/// Retries a failed batch event by event; its contacts go back for the next commit.
async fn retry(
    failed: Failed,
    db: &Db,
    notifier: &Notifier,
    contacts: &Contacts,
    memo: &mut status::DeviceMemo,
) {
    restore_contacts(contacts, failed.touched);
    commit_individually(db, notifier, failed.jobs, memo, failed.started).await;
}

/// One bad event must not fail its neighbours: each is committed on its own.
async fn commit_individually(
    db: &Db,
    notifier: &Notifier,
    jobs: Vec<Job>,
    memo: &mut status::DeviceMemo,
    started: std::time::Instant,
) {
    for job in jobs {
        let outcome = commit_batch(db, &[&job.event], HashMap::new(), memo)
            .await
            .map(|mut o| o.pop().unwrap_or(Ingested::Duplicate));
        match &outcome {
            Ok(o) => {
                record_metrics(std::slice::from_ref(o), started);
                announce(notifier, &[job.event.device], std::iter::empty());
            }
            Err(err) => {
                tracing::error!(error = %err, event_id = %job.event.event_id, "event could not be stored")
            }
        }
        let _ = job.done.send(outcome);
    }
}

/// The devices whose events a batch carries, each once.
fn sent_by(events: &[&NewEvent]) -> Vec<i32> {
    let mut devices: Vec<i32> = events.iter().map(|e| e.device).collect();
    devices.sort_unstable();
    devices.dedup();
    devices
}

fn record_metrics(outcomes: &[Ingested], started: std::time::Instant) {
    let stored = outcomes
        .iter()
        .filter(|o| matches!(o, Ingested::Stored))
        .count() as u64;
    metrics::counter!("ozone_events_ingested_total").increment(stored);
    metrics::counter!("ozone_events_duplicate_total").increment(outcomes.len() as u64 - stored);
    metrics::histogram!("ozone_ingest_batch_size").record(outcomes.len() as f64);
    metrics::histogram!("ozone_ingest_commit_seconds").record(started.elapsed().as_secs_f64());
}

fn take_contacts(contacts: &Contacts) -> HashMap<i32, status::DeviceUpdate> {
    std::mem::take(&mut *contacts.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Puts contacts back after a failed commit, merged with any that came in since.
fn restore_contacts(contacts: &Contacts, touched: HashMap<i32, status::DeviceUpdate>) {
    let mut current = contacts.lock().unwrap_or_else(|e| e.into_inner());
    for (device, update) in touched {
        let entry = current.entry(device).or_default();
        if let Some(at) = update.seen {
            entry.seen_at(at);
        }
        if let Some(at) = update.polled {
            entry.polled_at(at);
        }
    }
}

/// Tells subscribers which devices' events and contacts a commit stored.
fn announce(notifier: &Notifier, devices: &[i32], contacted: impl Iterator<Item = i32>) {
    if !devices.is_empty() {
        notifier.publish(Notification::EventsStored {
            devices: devices.to_vec(),
        });
    }
    let contacted: Vec<i32> = contacted.collect();
    if !contacted.is_empty() {
        notifier.publish(Notification::DevicesContacted { devices: contacted });
    }
}

async fn commit_contacts(
    db: &Db,
    notifier: &Notifier,
    contacts: &Contacts,
    memo: &mut status::DeviceMemo,
) {
    let touched = take_contacts(contacts);
    if touched.is_empty() {
        return;
    }
    let mut updates: Vec<(i32, status::DeviceUpdate)> = touched.clone().into_iter().collect();
    updates.sort_unstable_by_key(|(device, _)| *device);
    let result = async {
        let txn = db.begin_write().await?;
        let writes =
            status::record_many(&*txn, &updates, Utc::now(), memo, db.statement_bytes()).await?;
        txn.commit().await?;
        Ok::<_, Error>(writes)
    }
    .await;
    match result {
        Ok(writes) => {
            memo.absorb(writes);
            notifier.publish(Notification::DevicesContacted {
                devices: updates.iter().map(|(device, _)| *device).collect(),
            });
        }
        Err(err) => {
            tracing::warn!(error = %err, devices = updates.len(), "recording contacts failed; retrying with the next commit");
            restore_contacts(contacts, touched);
        }
    }
}

/// Commits a batch in one transaction and says, per event, whether it was new.
async fn commit_batch(
    db: &Db,
    events: &[&NewEvent],
    updates: HashMap<i32, status::DeviceUpdate>,
    memo: &mut status::DeviceMemo,
) -> Result<Vec<Ingested>> {
    let finished = prepare_batch(db, events, None)
        .await?
        .finish(events, updates, memo)
        .await?;
    let Finished {
        txn,
        outcomes,
        writes,
        timings,
    } = finished;
    txn.commit().await?;
    timings.log(events.len());
    // Remembered only once committed.
    memo.absorb(writes);
    Ok(outcomes)
}

/// A batch begun and its events inserted; the rows batches share are not written yet.
struct Prepared {
    txn: WriteTxn,
    statement_bytes: usize,
    now: DateTime<Utc>,
    attribution: Attribution,
    inserted: HashSet<(i32, String)>,
    devices: Vec<i32>,
    timings: Timings,
}

/// A batch with everything written, waiting for its commit.
struct Finished {
    txn: WriteTxn,
    outcomes: Vec<Ingested>,
    writes: status::DeviceMemo,
    timings: Timings,
}

/// Where a batch's time goes, statement by statement (`OZONE_LOG=ozone::ingest=debug`).
struct Timings {
    started: std::time::Instant,
    began: Duration,
    attributed: Duration,
    inserted: Duration,
    waited: Duration,
    shared: Duration,
    devices: usize,
}

impl Timings {
    fn log(&self, events: usize) {
        let us = |d: Duration| d.as_micros() as u64;
        tracing::debug!(
            target: "ozone::ingest",
            events,
            devices = self.devices,
            begin_us = us(self.began),
            attribution_us = us(self.attributed - self.began),
            insert_us = us(self.inserted - self.attributed),
            wait_us = us(self.waited - self.inserted),
            shared_us = us(self.shared - self.waited),
            commit_us = us(self.started.elapsed() - self.shared),
            "batch committed"
        );
    }
}

/// The first occurrence of each `(device, event_id)` in a batch: the one that may be new.
fn candidates<'e>(events: &[&'e NewEvent]) -> Vec<&'e NewEvent> {
    let mut first_seen: HashSet<(i32, &str)> = HashSet::with_capacity(events.len());
    events
        .iter()
        .copied()
        .filter(|e| first_seen.insert((e.device, e.event_id.as_str())))
        .collect()
}

/// Begins the batch's transaction, loads the bindings its events are attributed by (from
/// `cache` when it knows them), and inserts its events (rows no other batch writes).
async fn prepare_batch(
    db: &Db,
    events: &[&NewEvent],
    mut cache: Option<&mut AttributionCache>,
) -> Result<Prepared> {
    let candidates = candidates(events);
    let devices = sent_by(events);
    let started = std::time::Instant::now();
    let txn = db.begin_write().await?;
    let began = started.elapsed();
    let now = Utc::now();
    let earliest = candidates
        .iter()
        .map(|e| e.occurred_at)
        .min()
        .unwrap_or(now);
    let cached = cache.as_deref().and_then(|c| c.get(&devices, earliest));
    let (mut attribution, revision) = match cached {
        Some((attribution, revision)) => (attribution, Some(revision)),
        None => {
            let (attribution, revision) =
                Attribution::load_at_revision(&*txn, &devices, earliest).await?;
            if let (Some(cache), Some(revision)) = (cache.as_deref_mut(), revision) {
                cache.put(&attribution, &devices, earliest, revision);
            }
            (attribution, revision)
        }
    };
    let attributed = started.elapsed();
    let mut inserted: HashSet<(i32, String)> = HashSet::with_capacity(candidates.len());
    match txn.get_database_backend() {
        DbBackend::Postgres => {
            let mut stale = false;
            for rows in json_rows(&candidates, &attribution, db.statement_bytes())? {
                let (keys, seen) = insert_json_rows(&*txn, rows).await?;
                inserted.extend(keys);
                stale |= seen.is_some() && seen != revision;
            }
            if stale {
                // A binding changed after the attribution was read: the events just inserted
                // are attributed again, by the bindings as they are now.
                let (fresh, revision) =
                    Attribution::load_at_revision(&*txn, &devices, earliest).await?;
                reattribute(&*txn, &candidates, &inserted, &attribution, &fresh).await?;
                if let Some(cache) = cache {
                    cache.clear();
                    if let Some(revision) = revision {
                        cache.put(&fresh, &devices, earliest, revision);
                    }
                }
                attribution = fresh;
            }
        }
        _ => {
            for chunk in insert_chunks(&candidates) {
                inserted.extend(insert_events(&*txn, chunk, &attribution).await?);
            }
        }
    }
    let elapsed = started.elapsed();
    Ok(Prepared {
        txn,
        statement_bytes: db.statement_bytes(),
        now,
        attribution,
        inserted,
        timings: Timings {
            started,
            began,
            attributed,
            inserted: elapsed,
            waited: elapsed,
            shared: elapsed,
            devices: devices.len(),
        },
        devices,
    })
}

impl Prepared {
    /// Writes the rows batches share: the rollups of the new treatments and the senders'
    /// status. Every sender was seen now; each new event's report counts by its own time, so a
    /// buffered older event never overwrites a newer state.
    async fn finish(
        self,
        events: &[&NewEvent],
        mut updates: HashMap<i32, status::DeviceUpdate>,
        memo: &status::DeviceMemo,
    ) -> Result<Finished> {
        let Prepared {
            txn,
            statement_bytes,
            now,
            attribution,
            inserted,
            devices,
            mut timings,
        } = self;
        timings.waited = timings.started.elapsed();
        let candidates = candidates(events);
        // PostgreSQL: the rollup rides along with the status statement (one round trip less).
        let rollup = match txn.get_database_backend() {
            DbBackend::Postgres => {
                rollup::postgres_upsert(rollup::inserted(&candidates, &inserted, &attribution))
            }
            _ => {
                rollup::record_inserted(&*txn, &candidates, &inserted, &attribution).await?;
                None
            }
        };
        for device in &devices {
            updates.entry(*device).or_default().seen_at(now);
        }
        for event in &candidates {
            if inserted.contains(&(event.device, event.event_id.clone())) {
                updates.entry(event.device).or_default().report(
                    &event.report,
                    Stamp::of(event.occurred_at, event.received_at),
                );
            }
        }
        // In device order, so that writers in other processes lock status rows in the same
        // order as this one.
        let mut updates: Vec<(i32, status::DeviceUpdate)> = updates.into_iter().collect();
        updates.sort_unstable_by_key(|(device, _)| *device);
        let writes =
            status::record_many_carrying(&*txn, &updates, now, memo, statement_bytes, rollup)
                .await?;
        timings.shared = timings.started.elapsed();

        let mut claimed: HashSet<(i32, &str)> = HashSet::with_capacity(events.len());
        let outcomes = events
            .iter()
            .map(|e| {
                let key = (e.device, e.event_id.as_str());
                if claimed.insert(key) && inserted.contains(&(e.device, e.event_id.clone())) {
                    Ingested::Stored
                } else {
                    Ingested::Duplicate
                }
            })
            .collect();
        Ok(Finished {
            txn,
            outcomes,
            writes,
            timings,
        })
    }
}

impl Finished {
    /// Commits, then acknowledges every job and tells subscribers; a failed commit hands the
    /// jobs back for retrying.
    async fn commit(
        self,
        jobs: Vec<Job>,
        devices: Vec<i32>,
        touched: HashMap<i32, status::DeviceUpdate>,
        started: std::time::Instant,
        notifier: Notifier,
    ) -> Settled {
        let Finished {
            txn,
            outcomes,
            writes,
            timings,
        } = self;
        if let Err(err) = txn.commit().await {
            tracing::warn!(error = %err, size = jobs.len(), "event batch failed to commit");
            return Settled::Failed(Failed {
                jobs,
                touched,
                started,
            });
        }
        timings.log(jobs.len());
        record_metrics(&outcomes, started);
        announce(&notifier, &devices, touched.keys().copied());
        for (job, outcome) in jobs.into_iter().zip(outcomes) {
            let _ = job.done.send(Ok(outcome));
        }
        Settled::Committed(writes)
    }
}

/// SQLite: events per `INSERT`. Each statement is padded to a power of two by repeating its last
/// event (the copy conflicts with the original and is skipped), so only eight statement shapes
/// exist and all of them stay prepared.
const INSERT_MAX_ROWS: usize = 128;

/// SQLite: events per `INSERT`, at most [`INSERT_MAX_ROWS`] each.
fn insert_chunks<'a, 'e>(events: &'a [&'e NewEvent]) -> std::slice::Chunks<'a, &'e NewEvent> {
    events.chunks(INSERT_MAX_ROWS)
}

const EVENT_COLUMNS: [&str; 17] = [
    "device_id",
    "event_id",
    "event",
    "treatment",
    "counter",
    "event_type",
    "count_basic",
    "count_standard",
    "count_premium",
    "occurred_at",
    "occurred_epoch",
    "device_timestamp",
    "received_at",
    "wifi_status",
    "payload",
    "machine_id",
    "outlet_id",
];

/// `INSERT … ON CONFLICT DO NOTHING RETURNING` for `rows` events: the rows returned are the
/// ones that were new. Portable to SQLite (3.35+) and PostgreSQL; only placeholders differ.
fn insert_sql(backend: DbBackend, rows: usize) -> String {
    let columns = EVENT_COLUMNS.join(", ");
    let mut sql = format!("INSERT INTO telemetry_events ({columns}) VALUES ");
    let mut n = 0;
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for (col, name) in EVENT_COLUMNS.iter().enumerate() {
            if col > 0 {
                sql.push_str(", ");
            }
            n += 1;
            let p = placeholder(backend, n);
            if backend == DbBackend::Postgres && *name == "payload" {
                // The payload arrives as JSON text; PostgreSQL stores it as jsonb.
                sql.push_str(&format!("CAST({p} AS JSONB)"));
            } else {
                sql.push_str(&p);
            }
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT (device_id, event_id) DO NOTHING RETURNING device_id, event_id");
    sql
}

fn cached_insert_sql(backend: DbBackend, rows: usize) -> &'static str {
    use std::sync::OnceLock;
    static SQLITE: OnceLock<Vec<String>> = OnceLock::new();
    static POSTGRES: OnceLock<Vec<String>> = OnceLock::new();
    let (cell, backend) = match backend {
        DbBackend::Postgres => (&POSTGRES, DbBackend::Postgres),
        _ => (&SQLITE, DbBackend::Sqlite),
    };
    let shapes = cell.get_or_init(|| {
        (0..=INSERT_MAX_ROWS.trailing_zeros())
            .map(|power| insert_sql(backend, 1 << power))
            .collect()
    });
    &shapes[rows.trailing_zeros() as usize]
}

/// An event as a row of the JSON array PostgreSQL inserts from (`json_to_recordset`).
#[derive(serde::Serialize)]
struct JsonRow<'a> {
    device_id: i32,
    event_id: &'a str,
    event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    treatment: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    counter: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count_basic: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count_standard: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count_premium: Option<i64>,
    occurred_at: String,
    occurred_epoch: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_timestamp: Option<&'a str>,
    received_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    wifi_status: Option<bool>,
    /// Embedded as JSON, not as a string of it: smaller, and PostgreSQL keeps it as `jsonb`.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a serde_json::value::RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    machine_id: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outlet_id: Option<i32>,
}

/// Events as JSON arrays of rows, each array at most `budget` bytes (a single larger event goes
/// alone), for one `INSERT` each.
fn json_rows(
    events: &[&NewEvent],
    attribution: &Attribution,
    budget: usize,
) -> Result<Vec<String>> {
    // Microseconds, truncated: what PostgreSQL keeps of a bound timestamp.
    let time = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut arrays = Vec::new();
    let mut array = String::from("[");
    for e in events {
        let (machine_id, outlet_id) = attribution.at(e.device, e.occurred_at);
        let row = JsonRow {
            device_id: e.device,
            event_id: &e.event_id,
            event: e.kind.as_str(),
            treatment: e.treatment.map(Treatment::as_str),
            counter: e.counter,
            event_type: e.event_type.as_deref(),
            count_basic: e.legacy_counts.map(|c| c.basic),
            count_standard: e.legacy_counts.map(|c| c.standard),
            count_premium: e.legacy_counts.map(|c| c.premium),
            occurred_at: time(e.occurred_at),
            occurred_epoch: e.occurred_at.timestamp(),
            device_timestamp: e.device_timestamp.as_deref(),
            received_at: time(e.received_at),
            wifi_status: e.wifi_status,
            // The text of a body that was parsed as JSON; anything else would fail the cast the
            // column makes, so it is refused here as it would be there.
            payload: match e.payload.as_deref().map(serde_json::from_str) {
                Some(Ok(raw)) => Some(raw),
                Some(Err(_)) => {
                    return Err(Error::invalid("invalid_payload", "the payload is not JSON"))
                }
                None => None,
            },
            machine_id,
            outlet_id,
        };
        let row = serde_json::to_string(&row).unwrap_or_default();
        if array.len() > 1 && array.len() + row.len() + 1 > budget {
            array.push(']');
            arrays.push(std::mem::replace(&mut array, String::from("[")));
        }
        if array.len() > 1 {
            array.push(',');
        }
        array.push_str(&row);
    }
    if array.len() > 1 {
        array.push(']');
        arrays.push(array);
    }
    Ok(arrays)
}

/// One statement shape for any number of events: the rows travel as one JSON parameter.
const INSERT_JSON_SQL: &str = "INSERT INTO telemetry_events (device_id, event_id, event, \
    treatment, counter, event_type, count_basic, count_standard, count_premium, occurred_at, \
    occurred_epoch, device_timestamp, received_at, wifi_status, payload, machine_id, outlet_id) \
    SELECT device_id, event_id, event, treatment, counter, event_type, count_basic, \
    count_standard, count_premium, occurred_at, occurred_epoch, device_timestamp, received_at, \
    wifi_status, payload, machine_id, outlet_id \
    FROM json_to_recordset(CAST($1 AS JSON)) AS r(device_id INTEGER, event_id TEXT, event TEXT, \
    treatment TEXT, counter BIGINT, event_type TEXT, count_basic BIGINT, count_standard BIGINT, \
    count_premium BIGINT, occurred_at TIMESTAMPTZ, occurred_epoch BIGINT, device_timestamp TEXT, \
    received_at TIMESTAMPTZ, wifi_status BOOLEAN, payload JSONB, machine_id INTEGER, \
    outlet_id INTEGER) \
    ON CONFLICT (device_id, event_id) DO NOTHING \
    RETURNING device_id, event_id, (SELECT revision FROM binding_revision WHERE id = 1) AS revision";

/// Inserts the rows; returns the keys of the new ones, and the binding revision the statement
/// saw (when it inserted any).
async fn insert_json_rows(
    conn: &impl ConnectionTrait,
    rows: String,
) -> Result<(Vec<(i32, String)>, Option<i64>)> {
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            INSERT_JSON_SQL,
            [rows.into()],
        ))
        .await?;
    let revision = match rows.first() {
        Some(row) => row.try_get::<Option<i64>>("", "revision")?,
        None => None,
    };
    Ok((returned_keys(&rows)?, revision))
}

/// Sets the machine and outlet of the `inserted` events whose attribution `after` differs from
/// the one they were inserted with.
async fn reattribute(
    conn: &impl ConnectionTrait,
    candidates: &[&NewEvent],
    inserted: &HashSet<(i32, String)>,
    before: &Attribution,
    after: &Attribution,
) -> Result<()> {
    for e in candidates {
        let now = after.at(e.device, e.occurred_at);
        if before.at(e.device, e.occurred_at) == now
            || !inserted.contains(&(e.device, e.event_id.clone()))
        {
            continue;
        }
        conn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE telemetry_events SET machine_id = $1, outlet_id = $2 \
             WHERE device_id = $3 AND event_id = $4",
            [
                now.0.into(),
                now.1.into(),
                e.device.into(),
                e.event_id.clone().into(),
            ],
        ))
        .await?;
    }
    Ok(())
}

fn returned_keys(rows: &[sea_orm::QueryResult]) -> Result<Vec<(i32, String)>> {
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get::<i32>("", "device_id")?,
                row.try_get::<String>("", "event_id")?,
            ))
        })
        .collect::<std::result::Result<Vec<_>, DbErr>>()
        .map_err(Error::from)
}

async fn insert_events(
    conn: &impl ConnectionTrait,
    events: &[&NewEvent],
    attribution: &Attribution,
) -> Result<Vec<(i32, String)>> {
    let backend = conn.get_database_backend();
    let rows = events.len().next_power_of_two();
    let mut values: Vec<Value> = Vec::with_capacity(rows * EVENT_COLUMNS.len());
    for i in 0..rows {
        let e = events[i.min(events.len() - 1)];
        let (machine, outlet) = attribution.at(e.device, e.occurred_at);
        values.extend([
            e.device.into(),
            e.event_id.clone().into(),
            e.kind.as_str().into(),
            e.treatment.map(Treatment::as_str).into(),
            e.counter.into(),
            e.event_type.clone().into(),
            e.legacy_counts.map(|c| c.basic).into(),
            e.legacy_counts.map(|c| c.standard).into(),
            e.legacy_counts.map(|c| c.premium).into(),
            e.occurred_at.into(),
            e.occurred_at.timestamp().into(),
            e.device_timestamp.clone().into(),
            e.received_at.into(),
            e.wifi_status.into(),
            e.payload.clone().into(),
            machine.into(),
            outlet.into(),
        ]);
    }
    let sql = cached_insert_sql(backend, rows);
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?;
    returned_keys(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::NETWORK_STATEMENT_BYTES;
    use crate::domain::events::EventKind;

    fn event(payload: usize) -> NewEvent {
        let now = Utc::now();
        NewEvent {
            device: 1,
            event_id: "e".into(),
            kind: EventKind::Treatment,
            treatment: None,
            counter: None,
            event_type: None,
            legacy_counts: None,
            occurred_at: now,
            device_timestamp: None,
            received_at: now,
            wifi_status: None,
            payload: Some(format!("{{\"note\":\"{}\"}}", "x".repeat(payload))),
            report: Default::default(),
        }
    }

    #[test]
    fn network_statements_stay_within_their_byte_budget() {
        let events: Vec<NewEvent> = (0..300).map(|i| event(100 + i % 7 * 50)).collect();
        let refs: Vec<&NewEvent> = events.iter().collect();
        let attribution = Attribution::default();
        let arrays = json_rows(&refs, &attribution, NETWORK_STATEMENT_BYTES).unwrap();
        assert!(arrays.len() > 1);
        let mut rows = 0;
        for array in &arrays {
            assert!(array.len() <= NETWORK_STATEMENT_BYTES);
            let parsed: Vec<serde_json::Value> = serde_json::from_str(array).unwrap();
            rows += parsed.len();
        }
        assert_eq!(rows, 300, "every event in exactly one statement");
        let big = [event(60_000)];
        let big: Vec<&NewEvent> = big.iter().collect();
        let arrays = json_rows(&big, &attribution, NETWORK_STATEMENT_BYTES).unwrap();
        assert_eq!(arrays.len(), 1, "a larger event goes alone");
        assert_eq!(
            insert_chunks(&refs).len(),
            3,
            "128 rows a statement locally"
        );
    }

    #[test]
    fn a_payload_that_is_not_json_is_refused() {
        let mut bad = event(10);
        bad.payload = Some("{not json".into());
        let refs = [&bad];
        assert!(json_rows(&refs, &Attribution::default(), NETWORK_STATEMENT_BYTES).is_err());
    }
}
