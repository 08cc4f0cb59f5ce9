//! Concurrent work on one database: in one process, and (on PostgreSQL) across two replicas.
//! Every command transition is guarded by the state it leaves; bindings and first contacts
//! are enforced by the database.

use std::collections::HashMap;

use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::json;

use ozone::{
    db::entities::{command, device, machine, machine_device, outlet, telemetry_event},
    domain::{
        commands::{self, NewCommand},
        fleet,
    },
};

use crate::helpers::{on_postgres, spawn_app, spawn_app_with, Device, TestApp};

async fn queue(app: &TestApp, device: &Device, n: i32) {
    for i in 0..n {
        commands::create(
            &app.state.db,
            &app.state.notifier,
            &device.device_id,
            NewCommand {
                command_type: "PING".into(),
                priority: i % 3,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
}

/// Polls `device` from `clients` concurrent clients on each of `apps` until nothing is left;
/// returns how many times each command id was handed out.
async fn drain(apps: &[&TestApp], device: &Device, clients: usize) -> HashMap<String, usize> {
    let mut tasks = Vec::new();
    for app in apps {
        for _ in 0..clients {
            let http = app.http.clone();
            let url = app.url(&format!("/api/device/{}/commands/", device.device_id));
            let token = device.token.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let reply: serde_json::Value = http
                        .get(&url)
                        .bearer_auth(&token)
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    let list = reply["commands"].as_array().cloned().unwrap_or_default();
                    if list.is_empty() {
                        break got;
                    }
                    got.extend(
                        list.iter()
                            .map(|c| c["command_id"].as_str().unwrap().to_owned()),
                    );
                }
            }));
        }
    }
    let mut counts = HashMap::new();
    for task in tasks {
        for id in task.await.unwrap() {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_polls_of_one_device_hand_out_each_command_once() {
    let app = spawn_app_with(|s| s.poll_max_commands = 3).await;
    for n in 0..4 {
        let d = app
            .assigned_device(&format!("EC:E3:34:46:2B:{n:02X}"), &format!("M-{n}"))
            .await;
        queue(&app, &d, 25).await;
        let counts = drain(&[&app], &d, 4).await;
        assert_eq!(counts.len(), 25, "every command was handed out");
        assert!(
            counts.values().all(|c| *c == 1),
            "handed out more than once: {counts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poll_racing_a_cancel_never_brings_a_cancelled_command_back() {
    let app = spawn_app().await;
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    for _ in 0..10 {
        queue(&app, &d, 5).await;
        let pending = command::Entity::find()
            .filter(command::Column::Status.eq("pending"))
            .all(app.db())
            .await
            .unwrap();
        let state = app.state.clone();
        let cancels = tokio::spawn(async move {
            let mut ok = Vec::new();
            for c in pending {
                if commands::cancel(&state.db, &state.notifier, &c.command_id)
                    .await
                    .is_ok()
                {
                    ok.push(c.command_id);
                }
            }
            ok
        });
        let polled = app.poll(&d).await;
        let cancelled = cancels.await.unwrap();
        for id in &cancelled {
            let row = command::Entity::find()
                .filter(command::Column::CommandId.eq(id.as_str()))
                .one(app.db())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(row.status, "cancelled", "a successful cancel is final");
        }
        assert_eq!(polled.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_racing_a_cancel_ends_in_one_state() {
    let app = spawn_app().await;
    let d = app.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    for _ in 0..10 {
        queue(&app, &d, 1).await;
        let polled = app.poll(&d).await;
        let cid = polled.body["commands"][0]["command_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let state = app.state.clone();
        let to_cancel = cid.clone();
        let cancel = tokio::spawn(async move {
            commands::cancel(&state.db, &state.notifier, &to_cancel)
                .await
                .is_ok()
        });
        let result = app.report(&d, &cid, json!({"success": true})).await;
        let cancelled = cancel.await.unwrap();
        let row = command::Entity::find()
            .filter(command::Column::CommandId.eq(cid.as_str()))
            .one(app.db())
            .await
            .unwrap()
            .unwrap();
        if cancelled {
            assert_eq!(row.status, "cancelled");
            assert_eq!(
                result.body["status"], "cancelled",
                "the result changed nothing"
            );
        } else {
            assert_eq!(row.status, "executed");
            assert_eq!(result.body["status"], "executed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_assignments_of_one_machine_leave_one_open_binding() {
    let app = spawn_app().await;
    let a = app.handshake("EC:E3:34:46:2B:C0").await;
    let b = app.handshake("EC:E3:34:46:2B:C1").await;
    for round in 0..12 {
        let code = format!("M-{round}");
        let assign = |d: &Device| {
            let state = app.state.clone();
            let (id, code) = (d.device_id.clone(), code.clone());
            tokio::spawn(async move {
                fleet::assign_by_code(&state.db, &state.tokens, &id, &code, Some("North")).await
            })
        };
        let (ra, rb) = (assign(&a), assign(&b));
        for outcome in [ra.await.unwrap(), rb.await.unwrap()] {
            if let Err(err) = outcome {
                assert_eq!(err.code(), "conflict", "{err}");
            }
        }
        let machine = ozone::db::entities::machine::Entity::find()
            .filter(ozone::db::entities::machine::Column::MachineCode.eq(code.as_str()))
            .one(app.db())
            .await
            .unwrap()
            .unwrap();
        let open = machine_device::Entity::find()
            .filter(machine_device::Column::MachineId.eq(machine.id))
            .filter(machine_device::Column::UnassignedAt.is_null())
            .all(app.db())
            .await
            .unwrap();
        assert_eq!(open.len(), 1, "round {round}: {open:?}");
        assert_eq!(machine.current_device_id, Some(open[0].device_id));
        let per_device = machine_device::Entity::find()
            .filter(machine_device::Column::UnassignedAt.is_null())
            .count(app.db())
            .await
            .unwrap();
        assert!(per_device <= 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simultaneous_first_handshakes_of_one_mac_both_succeed_with_one_device() {
    let app = spawn_app().await;
    for n in 0..20 {
        let mac = format!("EC:E3:34:46:{n:02X}:C0");
        let body = json!({"mac": mac, "firmware": "1.0.0"});
        let (x, y) = tokio::join!(
            app.post_json("/api/handshake/", None, &body),
            app.post_json("/api/handshake/", None, &body),
        );
        assert_eq!((x.status, y.status), (200, 200), "{} {}", x.body, y.body);
        let devices = device::Entity::find()
            .filter(device::Column::Mac.eq(mac.as_str()))
            .count(app.db())
            .await
            .unwrap();
        assert_eq!(devices, 1);
    }
}

/// Two application instances on one PostgreSQL database. SQLite means one process.
async fn replicas() -> Option<(TestApp, TestApp)> {
    if !on_postgres() {
        eprintln!("SKIPPED: two replicas need PostgreSQL (set OZONE_TEST_DATABASE_URL)");
        return None;
    }
    let first = spawn_app_with(|s| s.poll_max_commands = 2).await;
    let second = first.replica_with(|s| s.poll_max_commands = 2).await;
    Some((first, second))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_never_hand_out_a_command_twice() {
    let Some((one, two)) = replicas().await else {
        return;
    };
    let d = one.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    queue(&one, &d, 40).await;
    let counts = drain(&[&one, &two], &d, 3).await;
    assert_eq!(counts.len(), 40);
    assert!(counts.values().all(|c| *c == 1), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_event_at_two_replicas_is_stored_once_and_acknowledged_by_both() {
    let Some((one, two)) = replicas().await else {
        return;
    };
    let d = one.handshake("EC:E3:34:46:2B:C0").await;
    for n in 0..20 {
        let id = format!("twice-{n}");
        let (x, y) = tokio::join!(
            one.post_event(&d, &id, json!({})),
            two.post_event(&d, &id, json!({}))
        );
        assert_eq!(x.body, json!({"ack": true, "event_id": id}));
        assert_eq!(y.body, x.body);
    }
    let stored = telemetry_event::Entity::find()
        .count(one.db())
        .await
        .unwrap();
    assert_eq!(stored, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sweepers_in_two_replicas_time_each_command_out_once() {
    let Some((one, two)) = replicas().await else {
        return;
    };
    let d = one.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    for _ in 0..30 {
        commands::create(
            &one.state.db,
            &one.state.notifier,
            &d.device_id,
            NewCommand {
                command_type: "PING".into(),
                expires_in: Some(std::time::Duration::ZERO),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    let later = chrono::Utc::now() + chrono::Duration::seconds(1);
    let (x, y) = tokio::join!(
        commands::sweep_expired(&one.state.db, &one.state.notifier, later),
        commands::sweep_expired(&two.state.db, &two.state.notifier, later),
    );
    let timed_out = command::Entity::find()
        .filter(command::Column::Status.eq("timeout"))
        .count(one.db())
        .await
        .unwrap();
    assert_eq!(timed_out, 30);
    assert!(
        x.unwrap() + y.unwrap() <= 30,
        "no command is transitioned twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_at_one_replica_for_a_command_handed_out_by_the_other() {
    let Some((one, two)) = replicas().await else {
        return;
    };
    let d = one.assigned_device("EC:E3:34:46:2B:C0", "M-1").await;
    queue(&one, &d, 1).await;
    let polled = one.poll(&d).await;
    let cid = polled.body["commands"][0]["command_id"].as_str().unwrap();
    let r = two.report(&d, cid, json!({"success": true})).await;
    assert_eq!(r.body["status"], "executed");
}

/// The machine code and outlet name an event was stored with.
async fn credited(app: &TestApp, event_id: &str) -> (Option<String>, Option<String>) {
    let event = telemetry_event::Entity::find()
        .filter(telemetry_event::Column::EventId.eq(event_id))
        .one(app.db())
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("event {event_id} is stored"));
    let machine = match event.machine_id {
        Some(id) => machine::Entity::find_by_id(id).one(app.db()).await.unwrap(),
        None => None,
    };
    let outlet = match event.outlet_id {
        Some(id) => outlet::Entity::find_by_id(id).one(app.db()).await.unwrap(),
        None => None,
    };
    (machine.map(|m| m.machine_code), outlet.map(|o| o.name))
}

/// A replica keeps the bindings it has read between batches of events: a device moved, a
/// machine moved to another outlet, a device unbound, or a machine deleted, by another process,
/// applies to the next events it stores all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bindings_changed_elsewhere_apply_to_a_replicas_next_events() {
    use sea_orm::ConnectionTrait;

    let Some((one, two)) = replicas().await else {
        return;
    };
    let d = one.handshake("EC:E3:34:46:2B:C0").await;
    let now = json!({"ts": null});
    let assign = |machine: &str, outlet: &str| {
        one.admin(&[
            "device",
            "assign",
            &d.device_id,
            "--machine",
            machine,
            "--outlet",
            outlet,
        ]);
    };
    let some = |m: &str, o: &str| (Some(m.to_owned()), Some(o.to_owned()));

    assign("M-1", "North");
    two.post_event(&d, "on-1", now.clone()).await;
    two.post_event(&d, "on-1-again", now.clone()).await;
    assert_eq!(credited(&two, "on-1-again").await, some("M-1", "North"));

    assign("M-2", "South");
    two.post_event(&d, "on-2", now.clone()).await;
    assert_eq!(credited(&two, "on-2").await, some("M-2", "South"));

    assign("M-2", "West");
    two.post_event(&d, "moved", now.clone()).await;
    assert_eq!(credited(&two, "moved").await, some("M-2", "West"));

    one.admin(&["device", "unassign", &d.device_id]);
    two.post_event(&d, "unbound", now.clone()).await;
    assert_eq!(credited(&two, "unbound").await, (None, None));

    assign("M-3", "East");
    two.post_event(&d, "on-3", now.clone()).await;
    assert_eq!(credited(&two, "on-3").await, some("M-3", "East"));
    let m3 = machine::Entity::find()
        .filter(machine::Column::MachineCode.eq("M-3"))
        .one(one.db())
        .await
        .unwrap()
        .unwrap()
        .id;
    for table in ["machine_devices", "machine_outlets"] {
        one.db()
            .execute_unprepared(&format!("DELETE FROM {table} WHERE machine_id = {m3}"))
            .await
            .unwrap();
    }
    one.db()
        .execute_unprepared(&format!("DELETE FROM machines WHERE id = {m3}"))
        .await
        .unwrap();
    let reply = two.post_event(&d, "deleted", now.clone()).await;
    assert_eq!(reply.body, json!({"ack": true, "event_id": "deleted"}));
    assert_eq!(credited(&two, "deleted").await, (None, None));
}

/// Whether this app's own database connection uses TLS (PostgreSQL).
async fn uses_tls(app: &TestApp) -> bool {
    use sea_orm::ConnectionTrait;
    app.db()
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ))
        .await
        .expect("pg_stat_ssl")
        .expect("row")
        .try_get::<bool>("", "ssl")
        .expect("ssl")
}

/// A URL that asks for TLS (`sslmode=require`) gets it, and the app works through it; one that
/// does not choose reaches a server on this machine without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_when_the_url_asks_for_it() {
    if !on_postgres() {
        eprintln!("SKIPPED: TLS to PostgreSQL needs PostgreSQL (set OZONE_TEST_DATABASE_URL)");
        return;
    }
    let app = spawn_app().await;
    let url = app.database_url.clone();
    if !url.contains("sslmode") && (url.contains("@127.0.0.1") || url.contains("@localhost")) {
        assert!(!uses_tls(&app).await, "loopback without sslmode: no TLS");
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    let tls = app
        .replica_at(format!("{url}{separator}sslmode=require"))
        .await;
    assert!(uses_tls(&tls).await, "sslmode=require: TLS");
    let device = tls.handshake("02:00:00:00:0A:01").await;
    let reply = tls
        .post_event(&device, "tls-1", json!({"treatment": "BASIC"}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let stored = ozone::db::entities::telemetry_event::Entity::find()
        .filter(ozone::db::entities::telemetry_event::Column::EventId.eq("tls-1"))
        .count(app.db())
        .await
        .expect("count");
    assert_eq!(stored, 1);
}

/// An event refers only to a device, machine and outlet that exist, whoever writes it: a device
/// with events cannot be deleted, and deleting a machine clears its events' reference (on
/// SQLite by foreign keys, on PostgreSQL by triggers that check each insert statement once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_refer_only_to_rows_that_exist() {
    use sea_orm::ConnectionTrait;

    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:D0").await;
    let (machine, outlet) =
        crate::helpers::bind_at(&app, &d, "M-REF", Some("O-REF"), "2025-09-01T00:00:00Z").await;
    let outlet = outlet.unwrap();
    let reply = app.post_event(&d, "ref-1", json!({})).await;
    assert_eq!(reply.body, json!({"ack": true, "event_id": "ref-1"}));
    let stored = telemetry_event::Entity::find()
        .one(app.db())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (stored.machine_id, stored.outlet_id),
        (Some(machine), Some(outlet)),
        "the event is attributed to its machine and outlet"
    );
    let dev = stored.device_id;

    let insert = |device: i32, machine: i32, outlet: i32, event_id: &str| {
        format!(
            "INSERT INTO telemetry_events (device_id, event_id, event, occurred_at, \
             occurred_epoch, received_at, machine_id, outlet_id) VALUES ({device}, \
             '{event_id}', 'treatment', '2026-01-01T00:00:00Z', 1767225600, \
             '2026-01-01T00:00:00Z', {machine}, {outlet})"
        )
    };
    let db = app.db();
    for (sql, what) in [
        (
            insert(dev + 1000, machine, outlet, "x-1"),
            "a missing device",
        ),
        (
            insert(dev, machine + 1000, outlet, "x-2"),
            "a missing machine",
        ),
        (
            insert(dev, machine, outlet + 1000, "x-3"),
            "a missing outlet",
        ),
    ] {
        let err = db
            .execute_unprepared(&sql)
            .await
            .expect_err(&format!("an event for {what} is refused"));
        assert!(
            err.to_string().to_lowercase().contains("foreign key"),
            "{what}: {err}"
        );
    }
    db.execute_unprepared(&insert(dev, machine, outlet, "x-4"))
        .await
        .expect("an event for rows that exist is stored");

    let err = db
        .execute_unprepared(&format!("DELETE FROM devices WHERE id = {}", dev))
        .await
        .expect_err("a device with events stays");
    assert!(
        err.to_string().to_lowercase().contains("foreign key"),
        "{err}"
    );

    db.execute_unprepared(&format!(
        "DELETE FROM machine_devices WHERE machine_id = {machine}"
    ))
    .await
    .unwrap();
    db.execute_unprepared(&format!(
        "DELETE FROM machine_outlets WHERE machine_id = {machine}"
    ))
    .await
    .unwrap();
    db.execute_unprepared(&format!("DELETE FROM machines WHERE id = {machine}"))
        .await
        .unwrap();
    let left = telemetry_event::Entity::find()
        .filter(telemetry_event::Column::MachineId.is_not_null())
        .count(db)
        .await
        .unwrap();
    assert_eq!(left, 0, "no event refers to the deleted machine");
}
