//! The hourly rollup of treatments: what usage statistics read instead of raw events.
//!
//! Three tables (see migration `m20261202_000005_rollup`), each a count per UTC hour and
//! treatment: per device/machine/outlet (`stats_hourly`), per outlet (`stats_hourly_outlets`)
//! and for the whole fleet (`stats_hourly_fleet`). They are kept exact inside the transaction
//! that stores the events (one upsert per distinct key per batch), and inside the flush that
//! deletes events. A late event lands in the hour it happened, like any other.
//!
//! "No machine" and "no outlet" are stored as 0, so that keys hold no NULLs and
//! `ON CONFLICT` always matches.

use std::collections::{BTreeMap, HashSet};
use std::sync::OnceLock;

use sea_orm::{ConnectionTrait, DbBackend, Statement, Value};

use crate::{
    domain::{
        events::{EventKind, NewEvent, Treatment},
        fleet::Attribution,
        status::Carried,
    },
    error::Result,
};

/// Seconds in a rollup bucket.
pub const HOUR: i64 = 3600;

/// The stored code of a treatment.
pub fn treatment_code(t: Treatment) -> i16 {
    match t {
        Treatment::Basic => 0,
        Treatment::Standard => 1,
        Treatment::Premium => 2,
    }
}

/// The SQL expression that turns `telemetry_events.treatment` into its stored code.
pub const TREATMENT_CODE_SQL: &str =
    "CASE treatment WHEN 'BASIC' THEN 0 WHEN 'STANDARD' THEN 1 WHEN 'PREMIUM' THEN 2 END";

/// One treatment to count, with the attribution it was stored with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub device: i32,
    pub occurred_epoch: i64,
    pub machine: Option<i32>,
    pub outlet: Option<i32>,
    pub treatment: Treatment,
}

/// The treatments among `candidates` that this transaction inserted (`inserted`), attributed
/// as they were stored.
pub fn inserted<'a>(
    candidates: &'a [&'a NewEvent],
    inserted: &'a HashSet<(i32, String)>,
    attribution: &'a Attribution,
) -> impl Iterator<Item = Counted> + 'a {
    let new: HashSet<(i32, &str)> = inserted.iter().map(|(d, e)| (*d, e.as_str())).collect();
    candidates.iter().filter_map(move |e| {
        let treatment = e.treatment.filter(|_| e.kind == EventKind::Treatment)?;
        if !new.contains(&(e.device, e.event_id.as_str())) {
            return None;
        }
        let (machine, outlet) = attribution.at(e.device, e.occurred_at);
        Some(Counted {
            device: e.device,
            occurred_epoch: e.occurred_at.timestamp(),
            machine,
            outlet,
            treatment,
        })
    })
}

/// Adds to the rollup the treatments among `candidates` that this transaction inserted
/// (`inserted`), attributed as they were stored. Called by the event writer right after its
/// insert, inside the same transaction.
pub async fn record_inserted(
    conn: &impl ConnectionTrait,
    candidates: &[&NewEvent],
    inserted: &HashSet<(i32, String)>,
    attribution: &Attribution,
) -> Result<()> {
    add(conn, self::inserted(candidates, inserted, attribution)).await
}

/// One upsert row per distinct key of each level: (hour, device, machine, outlet, treatment),
/// (hour, outlet, treatment) and (hour, treatment), in key order.
struct Levels {
    devices: BTreeMap<(i64, i32, i32, i32, i16), i64>,
    outlets: BTreeMap<(i64, i32, i16), i64>,
    fleet: BTreeMap<(i64, i16), i64>,
}

impl Levels {
    fn of(treatments: impl IntoIterator<Item = Counted>) -> Option<Levels> {
        let mut devices: BTreeMap<(i64, i32, i32, i32, i16), i64> = BTreeMap::new();
        for t in treatments {
            let key = (
                t.occurred_epoch.div_euclid(HOUR) * HOUR,
                t.device,
                t.machine.unwrap_or(0),
                t.outlet.unwrap_or(0),
                treatment_code(t.treatment),
            );
            *devices.entry(key).or_default() += 1;
        }
        if devices.is_empty() {
            return None;
        }
        let mut outlets: BTreeMap<(i64, i32, i16), i64> = BTreeMap::new();
        let mut fleet: BTreeMap<(i64, i16), i64> = BTreeMap::new();
        for (&(hour, _, _, outlet, treatment), &n) in &devices {
            *outlets.entry((hour, outlet, treatment)).or_default() += n;
            *fleet.entry((hour, treatment)).or_default() += n;
        }
        Some(Levels {
            devices,
            outlets,
            fleet,
        })
    }
}

/// Adds treatments to all three rollup levels: one upsert row per distinct key, in key order
/// (so that concurrent writers on PostgreSQL lock rows in the same order and cannot deadlock).
pub async fn add(
    conn: &impl ConnectionTrait,
    treatments: impl IntoIterator<Item = Counted>,
) -> Result<()> {
    let Some(levels) = Levels::of(treatments) else {
        return Ok(());
    };
    if conn.get_database_backend() == DbBackend::Postgres {
        return postgres_carried(&levels).run(conn).await;
    }
    let Levels {
        devices,
        outlets,
        fleet,
    } = levels;
    upsert(
        conn,
        Level::Device,
        devices
            .into_iter()
            .map(|((h, d, m, o, t), n)| [h, d.into(), m.into(), o.into(), t.into(), n])
            .collect(),
    )
    .await?;
    upsert(
        conn,
        Level::Outlet,
        outlets
            .into_iter()
            .map(|((h, o, t), n)| [h, o.into(), t.into(), n])
            .collect(),
    )
    .await?;
    upsert(
        conn,
        Level::Fleet,
        fleet
            .into_iter()
            .map(|((h, t), n)| [h, t.into(), n])
            .collect(),
    )
    .await?;
    Ok(())
}

/// PostgreSQL: all three levels as data-modifying `WITH` queries over `$1`-`$3` (each level's
/// rows as a JSON array, in key order), which a statement runs whatever its main part: one
/// shape whatever the number of keys, and no round trip of its own when another statement
/// carries it.
pub const POSTGRES_UPSERT: &str = "rollup_devices AS (INSERT INTO stats_hourly \
    (bucket_hour, device_id, machine_id, outlet_id, treatment, count) \
    SELECT r.* FROM json_to_recordset(CAST($1 AS JSON)) AS r(bucket_hour BIGINT, \
    device_id INTEGER, machine_id INTEGER, outlet_id INTEGER, treatment SMALLINT, \
    count BIGINT) \
    ON CONFLICT (bucket_hour, device_id, machine_id, outlet_id, treatment) \
    DO UPDATE SET count = stats_hourly.count + excluded.count), \
    rollup_outlets AS (INSERT INTO stats_hourly_outlets (bucket_hour, outlet_id, treatment, count) \
    SELECT r.* FROM json_to_recordset(CAST($2 AS JSON)) AS r(bucket_hour BIGINT, \
    outlet_id INTEGER, treatment SMALLINT, count BIGINT) \
    ON CONFLICT (bucket_hour, outlet_id, treatment) \
    DO UPDATE SET count = stats_hourly_outlets.count + excluded.count), \
    rollup_fleet AS (INSERT INTO stats_hourly_fleet (bucket_hour, treatment, count) \
    SELECT r.* FROM json_to_recordset(CAST($3 AS JSON)) AS r(bucket_hour BIGINT, \
    treatment SMALLINT, count BIGINT) \
    ON CONFLICT (bucket_hour, treatment) \
    DO UPDATE SET count = stats_hourly_fleet.count + excluded.count)";

/// PostgreSQL: [`POSTGRES_UPSERT`] for `treatments`, for a status statement to carry; `None`
/// when there is nothing to count.
pub fn postgres_upsert(treatments: impl IntoIterator<Item = Counted>) -> Option<Carried> {
    Levels::of(treatments).map(|levels| postgres_carried(&levels))
}

fn postgres_carried(levels: &Levels) -> Carried {
    let json = |rows: Vec<serde_json::Value>| serde_json::Value::Array(rows).to_string();
    let devices = json(
        levels
            .devices
            .iter()
            .map(|(&(h, d, m, o, t), &n)| {
                serde_json::json!({"bucket_hour": h, "device_id": d, "machine_id": m,
                    "outlet_id": o, "treatment": t, "count": n})
            })
            .collect(),
    );
    let outlets = json(
        levels
            .outlets
            .iter()
            .map(|(&(h, o, t), &n)| {
                serde_json::json!({"bucket_hour": h, "outlet_id": o, "treatment": t, "count": n})
            })
            .collect(),
    );
    let fleet = json(
        levels
            .fleet
            .iter()
            .map(|(&(h, t), &n)| serde_json::json!({"bucket_hour": h, "treatment": t, "count": n}))
            .collect(),
    );
    Carried {
        ctes: POSTGRES_UPSERT,
        values: vec![devices.into(), outlets.into(), fleet.into()],
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Device,
    Outlet,
    Fleet,
}

impl Level {
    const ALL: [Level; 3] = [Level::Device, Level::Outlet, Level::Fleet];

    fn table(self) -> &'static str {
        match self {
            Level::Device => "stats_hourly",
            Level::Outlet => "stats_hourly_outlets",
            Level::Fleet => "stats_hourly_fleet",
        }
    }

    /// The key columns, and for each the expression over `telemetry_events` it comes from.
    fn key(self) -> &'static [(&'static str, &'static str)] {
        const HOUR_OF_EVENT: &str = "(occurred_epoch / 3600) * 3600";
        match self {
            Level::Device => &[
                ("bucket_hour", HOUR_OF_EVENT),
                ("device_id", "device_id"),
                ("machine_id", "COALESCE(machine_id, 0)"),
                ("outlet_id", "COALESCE(outlet_id, 0)"),
                ("treatment", TREATMENT_CODE_SQL),
            ],
            Level::Outlet => &[
                ("bucket_hour", HOUR_OF_EVENT),
                ("outlet_id", "COALESCE(outlet_id, 0)"),
                ("treatment", TREATMENT_CODE_SQL),
            ],
            Level::Fleet => &[
                ("bucket_hour", HOUR_OF_EVENT),
                ("treatment", TREATMENT_CODE_SQL),
            ],
        }
    }
}

/// The SQLite upsert of any number of rows: they come as one JSON array of arrays, so a
/// level takes one prepared statement per batch whatever its size.
fn sqlite_upsert_sql(level: Level) -> String {
    let table = level.table();
    let key: Vec<&str> = level.key().iter().map(|(c, _)| *c).collect();
    let fields: Vec<String> = (0..=key.len()).map(|i| format!("value ->> {i}")).collect();
    // `WHERE true` tells SQLite that `ON` starts the upsert clause, not a join constraint.
    format!(
        "INSERT INTO {table} ({}, count) SELECT {} FROM json_each(?) WHERE true \
         ON CONFLICT ({}) DO UPDATE SET count = {table}.count + excluded.count",
        key.join(", "),
        fields.join(", "),
        key.join(", ")
    )
}

fn cached_sqlite_upsert_sql(level: Level) -> &'static str {
    static SHAPES: OnceLock<Vec<String>> = OnceLock::new();
    let shapes = SHAPES.get_or_init(|| Level::ALL.iter().map(|l| sqlite_upsert_sql(*l)).collect());
    &shapes[Level::ALL.iter().position(|x| *x == level).unwrap_or(0)]
}

/// SQLite: adds `rows` (each the level's key columns and a count) to a level, in their order.
async fn upsert<const N: usize>(
    conn: &impl ConnectionTrait,
    level: Level,
    rows: Vec<[i64; N]>,
) -> Result<()> {
    let mut json = String::with_capacity(rows.len() * (N * 8 + 4) + 2);
    let mut int = itoa::Buffer::new();
    json.push('[');
    for (i, row) in rows.iter().enumerate() {
        json.push_str(if i == 0 { "[" } else { ",[" });
        for (j, v) in row.iter().enumerate() {
            if j > 0 {
                json.push(',');
            }
            json.push_str(int.format(*v));
        }
        json.push(']');
    }
    json.push(']');
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Sqlite,
        cached_sqlite_upsert_sql(level),
        [Value::from(json)],
    ))
    .await?;
    Ok(())
}

/// Which events a flush deletes, as a SQL condition over `telemetry_events` and its values
/// (placeholders numbered from 1).
pub struct Deleted<'a> {
    pub condition: &'a str,
    pub values: &'a [Value],
}

/// Takes the treatments among the events `deleted` selects out of every rollup level; call it
/// in the flush's transaction before deleting them. `None` means every event.
pub async fn subtract(conn: &impl ConnectionTrait, deleted: Option<Deleted<'_>>) -> Result<()> {
    let backend = conn.get_database_backend();
    let Some(deleted) = deleted else {
        for level in Level::ALL {
            conn.execute_unprepared(&format!("DELETE FROM {}", level.table()))
                .await?;
        }
        return Ok(());
    };
    for level in Level::ALL {
        let table = level.table();
        let key = level.key();
        let columns: Vec<String> = key.iter().map(|(c, e)| format!("{e} AS {c}")).collect();
        let groups: Vec<&str> = key.iter().map(|(_, e)| *e).collect();
        let matches: Vec<String> = key
            .iter()
            .map(|(c, _)| format!("{table}.{c} = d.{c}"))
            .collect();
        // `UPDATE … FROM` is the same text on SQLite (3.33+) and PostgreSQL.
        let sql = format!(
            "UPDATE {table} SET count = {table}.count - d.n FROM (\
             SELECT {}, COUNT(*) AS n FROM telemetry_events \
             WHERE event = 'treatment' AND treatment IN ('BASIC', 'STANDARD', 'PREMIUM') AND ({}) \
             GROUP BY {}) AS d WHERE {}",
            columns.join(", "),
            deleted.condition,
            groups.join(", "),
            matches.join(" AND "),
        );
        conn.execute_raw(Statement::from_sql_and_values(
            backend,
            sql,
            deleted.values.to_vec(),
        ))
        .await?;
        conn.execute_unprepared(&format!("DELETE FROM {table} WHERE count <= 0"))
            .await?;
    }
    Ok(())
}

/// Rebuilds every level from the raw events (for repairs and checks; ingest and flush keep the
/// rollup exact on their own).
pub async fn rebuild(conn: &impl ConnectionTrait) -> Result<()> {
    subtract(conn, None).await?;
    for level in Level::ALL {
        let key = level.key();
        let columns: Vec<&str> = key.iter().map(|(c, _)| *c).collect();
        let exprs: Vec<&str> = key.iter().map(|(_, e)| *e).collect();
        conn.execute_unprepared(&format!(
            "INSERT INTO {} ({}, count) SELECT {}, COUNT(*) FROM telemetry_events \
             WHERE event = 'treatment' AND treatment IN ('BASIC', 'STANDARD', 'PREMIUM') \
             GROUP BY {}",
            level.table(),
            columns.join(", "),
            exprs.join(", "),
            exprs.join(", "),
        ))
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsert_statements_add_to_existing_counts() {
        assert_eq!(
            sqlite_upsert_sql(Level::Outlet),
            "INSERT INTO stats_hourly_outlets (bucket_hour, outlet_id, treatment, count) \
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each(?) \
             WHERE true ON CONFLICT (bucket_hour, outlet_id, treatment) DO UPDATE SET \
             count = stats_hourly_outlets.count + excluded.count"
        );
        assert_eq!(
            cached_sqlite_upsert_sql(Level::Fleet),
            sqlite_upsert_sql(Level::Fleet)
        );
    }
}
