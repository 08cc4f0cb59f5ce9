//! `spawn_app()`: the application on an ephemeral port with its own database.

use std::{net::SocketAddr, process::Command, sync::Arc};

use chrono::{DateTime, Utc};
use ozone::{
    domain::{devices, fleet},
    AppState, Application, Settings,
};
use serde_json::{json, Value};
use tokio::{sync::oneshot, task::JoinHandle};

pub struct TestApp {
    pub addr: SocketAddr,
    /// The dedicated `/metrics` listener, when `metrics_addr` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// The HTTPS listener, when `https_addr` is set.
    pub https_addr: Option<SocketAddr>,
    /// The embedded MQTT broker, when the test turned it on (see [`spawn_mqtt_app`]).
    pub mqtt: Option<SocketAddr>,
    /// Its MQTT-over-TLS listener, when the test set `mqtts_addr`.
    pub mqtts: Option<SocketAddr>,
    pub base: String,
    pub database_url: String,
    pub http: reqwest::Client,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    /// Dropped after the server is told to stop (see `Drop`).
    resources: Option<TestResources>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// What one test owns and gives back when it ends: a temporary directory (and the SQLite file
/// in it), or a database on the PostgreSQL server, dropped with the test.
pub struct TestResources {
    _dir: tempfile::TempDir,
    _database: Option<PostgresDatabase>,
}

/// A database made for one test on `OZONE_TEST_DATABASE_URL`; dropped when the test ends.
struct PostgresDatabase {
    admin_url: String,
    name: String,
}

impl Drop for PostgresDatabase {
    fn drop(&mut self) {
        use sea_orm::ConnectionTrait;
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // The test's runtime may be ending: drop on a thread with a runtime of its own.
        // `WITH (FORCE)` closes connections a still-running server holds.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let admin = sea_orm::Database::connect(admin_url.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let result = admin.execute_unprepared(&sql).await;
                let _ = admin.close().await;
                result.map(|_| ()).map_err(|e| e.to_string())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("test database {} was not dropped: {dropped:?}", self.name);
        }
    }
}

/// A fresh database for one test: a SQLite file in a temporary directory, or, when
/// `OZONE_TEST_DATABASE_URL` names a PostgreSQL server, a new database on it.
async fn fresh_database() -> (String, TestResources) {
    let dir = tempfile::tempdir().expect("temp dir");
    match std::env::var("OZONE_TEST_DATABASE_URL") {
        Ok(admin_url) if admin_url.starts_with("postgres") => {
            use sea_orm::ConnectionTrait;
            let name = format!("ozone_test_{}", uuid::Uuid::now_v7().simple());
            let admin = sea_orm::Database::connect(admin_url.as_str())
                .await
                .expect("connect to OZONE_TEST_DATABASE_URL");
            admin
                .execute_unprepared(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create test database");
            admin.close().await.expect("close admin connection");
            let base = admin_url
                .rsplit_once('/')
                .map(|(base, _)| base)
                .expect("URL with a database name");
            let url = format!("{base}/{name}");
            let database = PostgresDatabase { admin_url, name };
            (
                url,
                TestResources {
                    _dir: dir,
                    _database: Some(database),
                },
            )
        }
        _ => (
            format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("ozone.db").display()
            ),
            TestResources {
                _dir: dir,
                _database: None,
            },
        ),
    }
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let (database_url, resources) = fresh_database().await;
    spawn_app_on(database_url, resources, configure).await
}

/// Whether the suite runs on PostgreSQL (`OZONE_TEST_DATABASE_URL`).
pub fn on_postgres() -> bool {
    std::env::var("OZONE_TEST_DATABASE_URL").is_ok_and(|u| u.starts_with("postgres"))
}

impl TestApp {
    /// A second application instance on this app's database, as another replica would be,
    /// with its own settings.
    pub async fn replica_with(&self, configure: impl FnOnce(&mut Settings)) -> TestApp {
        let resources = TestResources {
            _dir: tempfile::tempdir().expect("temp dir"),
            _database: None,
        };
        spawn_app_on(self.database_url.clone(), resources, configure).await
    }

    /// A second application instance on this app's database, reached through `url`.
    pub async fn replica_at(&self, url: String) -> TestApp {
        let resources = TestResources {
            _dir: tempfile::tempdir().expect("temp dir"),
            _database: None,
        };
        spawn_app_on(url, resources, |_| {}).await
    }
}

async fn spawn_app_on(
    database_url: String,
    resources: TestResources,
    configure: impl FnOnce(&mut Settings),
) -> TestApp {
    let mut settings = Settings {
        http_addr: "127.0.0.1:0".into(),
        // Off unless a test asks for it: most tests need no broker.
        mqtt_addr: String::new(),
        database_url: database_url.clone(),
        log: "warn".into(),
        ..Settings::default()
    };
    configure(&mut settings);
    let app = Application::build(settings).await.expect("app builds");
    let addr = app.http_addr();
    let metrics_addr = app.metrics_addr();
    let https_addr = app.https_addr();
    let mqtt = app.mqtt_addr();
    let mqtts = app.mqtts_addr();
    let state = app.state();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestApp {
        addr,
        metrics_addr,
        https_addr,
        mqtt,
        mqtts,
        base: format!("http://{addr}"),
        database_url,
        http: reqwest::Client::new(),
        state,
        stop: Some(stop),
        server: Some(server),
        resources: Some(resources),
    }
}

/// The application with its MQTT broker on an ephemeral loopback port.
pub async fn spawn_mqtt_app() -> TestApp {
    spawn_mqtt_app_with(|_| {}).await
}

pub async fn spawn_mqtt_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_with(|s| {
        s.mqtt_addr = "127.0.0.1:0".into();
        configure(s);
    })
    .await
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    async fn from(resp: reqwest::Response) -> Reply {
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("response is not JSON (status {status}): {text}"))
        };
        Reply { status, body }
    }

    /// Asserts an error reply with its stable code.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert_eq!(self.body["code"], code, "body: {}", self.body);
        assert!(self.body["error"].is_string(), "body: {}", self.body);
        assert!(self.body["detail"].is_string(), "body: {}", self.body);
    }
}

pub struct Device {
    pub device_id: String,
    pub token: String,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn post_json(&self, path: &str, token: Option<&str>, body: &Value) -> Reply {
        let mut req = self.http.post(self.url(path)).json(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        Reply::from(req.send().await.expect("request")).await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> Reply {
        let mut req = self
            .http
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        Reply::from(req.send().await.expect("request")).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        let mut req = self.http.get(self.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        Reply::from(req.send().await.expect("request")).await
    }

    pub async fn handshake(&self, mac: &str) -> Device {
        let reply = self
            .post_json(
                "/api/handshake/",
                None,
                &json!({ "mac": mac, "firmware": "1.0.0" }),
            )
            .await;
        assert_eq!(reply.status, 200, "handshake: {}", reply.body);
        Device {
            device_id: reply.body["device_id"]
                .as_str()
                .expect("device_id")
                .to_owned(),
            token: reply.body["token"].as_str().expect("token").to_owned(),
        }
    }

    /// A device that has handshaken and is bound to a machine.
    pub async fn assigned_device(&self, mac: &str, machine: &str) -> Device {
        let device = self.handshake(mac).await;
        self.admin(&["device", "assign", &device.device_id, "--machine", machine]);
        device
    }

    pub async fn post_event(&self, device: &Device, event_id: &str, extra: Value) -> Reply {
        let mut body = json!({
            "device_id": device.device_id,
            "firmware": "1.0.0",
            "event_id": event_id,
            "event": "treatment",
            "treatment": "BASIC",
            "counter": 1,
            "ts": "2025-09-16T12:34:56Z",
        });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                body.insert(k.clone(), v.clone());
            }
        }
        self.post_json("/api/device/events/", Some(&device.token), &body)
            .await
    }

    pub async fn poll(&self, device: &Device) -> Reply {
        self.get(
            &format!("/api/device/{}/commands/", device.device_id),
            Some(&device.token),
        )
        .await
    }

    pub async fn report(&self, device: &Device, command: &str, body: Value) -> Reply {
        self.post_json(
            &format!("/api/device/{}/commands/{}/", device.device_id, command),
            Some(&device.token),
            &body,
        )
        .await
    }

    /// Runs the `ozone` binary against this app's database; returns stdout, panics on failure.
    pub fn admin(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.try_admin(args);
        assert!(ok, "ozone {args:?} failed: {stderr}");
        stdout
    }

    pub fn try_admin(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_ozone"))
            .args(args)
            .env("DATABASE_URL", &self.database_url)
            .env("OZONE_LOG", "warn")
            .env_remove("RUST_LOG")
            .output()
            .expect("run ozone");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `ozone command send …`; returns the printed command.
    pub fn send_command(&self, device: &Device, command_type: &str, extra: &[&str]) -> Value {
        let mut args = vec!["command", "send", &device.device_id, command_type];
        args.extend_from_slice(extra);
        serde_json::from_str(&self.admin(&args)).expect("command send prints JSON")
    }

    pub fn db(&self) -> &sea_orm::DatabaseConnection {
        self.state.db.conn()
    }

    /// Stops the server gracefully and waits for it; the database stays for inspection.
    pub async fn stop(mut self) -> StoppedApp {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task")
                .expect("server stops cleanly");
        }
        StoppedApp {
            database_url: self.database_url.clone(),
            _resources: self.resources.take(),
        }
    }
}

/// A stopped app's database, kept for inspection until this is dropped.
pub struct StoppedApp {
    pub database_url: String,
    _resources: Option<TestResources>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A logged-in staff API user.
pub struct Staff {
    pub token: String,
}

impl TestApp {
    /// Creates a user with the given roles and logs it in.
    pub async fn user(&self, username: &str, is_staff: bool, is_superuser: bool) -> Staff {
        ozone::domain::users::create(
            &self.state.db,
            ozone::domain::users::NewUser {
                username: username.into(),
                password: "correct horse battery".into(),
                is_staff,
                is_superuser,
                ..Default::default()
            },
        )
        .await
        .expect("create user");
        let reply = self
            .staff_call(
                reqwest::Method::POST,
                "/api/auth/login/",
                None,
                Some(&json!({"username": username, "password": "correct horse battery"})),
            )
            .await;
        assert_eq!(reply.status, 200, "login: {}", reply.body);
        Staff {
            token: reply.body["token"].as_str().expect("token").to_owned(),
        }
    }

    /// A staff (not superuser) account, logged in.
    pub async fn staff(&self) -> Staff {
        self.user("staff", true, false).await
    }

    /// A staff API call with an optional bearer token and JSON body.
    pub async fn staff_call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        Reply::from(req.send().await.expect("request")).await
    }

    pub async fn staff_get(&self, path: &str, who: &Staff) -> Reply {
        self.staff_call(reqwest::Method::GET, path, Some(&who.token), None)
            .await
    }

    pub async fn staff_post(&self, path: &str, who: &Staff, body: &Value) -> Reply {
        self.staff_call(reqwest::Method::POST, path, Some(&who.token), Some(body))
            .await
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-built fleets for the statistics tests: bindings at chosen times, events through ingest.

pub fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

/// Binds `device` to the machine `code` (in `outlet`, created as needed) as of `when`;
/// returns the machine's and the outlet's ids.
pub async fn bind_at(
    app: &TestApp,
    device: &Device,
    code: &str,
    outlet: Option<&str>,
    when: &str,
) -> (i32, Option<i32>) {
    let when = at(when);
    let db = &app.state.db;
    let txn = db.begin_write().await.expect("write");
    let outlet_id = match outlet {
        Some(name) => Some(
            fleet::outlet_named(&*txn, name, when)
                .await
                .expect("outlet")
                .0
                .id,
        ),
        None => None,
    };
    let (machine, _) = fleet::machine_coded(&*txn, code, outlet_id, when)
        .await
        .expect("machine");
    if machine.outlet_id != outlet_id {
        fleet::set_machine_outlet(&*txn, machine.id, outlet_id, when)
            .await
            .expect("outlet history");
    }
    let model = devices::find_by_device_id(&*txn, &device.device_id)
        .await
        .expect("device");
    let machine = ozone::db::entities::machine::Model {
        outlet_id,
        ..machine
    };
    fleet::bind(&*txn, &machine, &model, when)
        .await
        .expect("bind");
    txn.commit().await.expect("commit");
    app.state.tokens.evict_device(model.id);
    (machine.id, outlet_id)
}

pub async fn treat(app: &TestApp, device: &Device, event_id: &str, treatment: &str, ts: &str) {
    treat_with(app, device, event_id, treatment, ts, json!({})).await;
}

pub async fn treat_with(
    app: &TestApp,
    device: &Device,
    event_id: &str,
    treatment: &str,
    ts: &str,
    extra: Value,
) {
    let mut body = json!({ "treatment": treatment, "ts": ts });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let reply = app.post_event(device, event_id, body).await;
    assert_eq!(reply.status, 200, "event {event_id}: {}", reply.body);
}
