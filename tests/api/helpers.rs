//! `spawn_app()`: the application on an ephemeral port with its own database.

use std::{net::SocketAddr, process::Command, sync::Arc};

use ozone::{AppState, Application, Settings};
use serde_json::{json, Value};
use tokio::{sync::oneshot, task::JoinHandle};

pub struct TestApp {
    pub addr: SocketAddr,
    /// The dedicated `/metrics` listener, when `metrics_addr` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub base: String,
    pub database_url: String,
    pub http: reqwest::Client,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// A fresh database for one test: a SQLite file in a temporary directory, or, when
/// `OZONE_TEST_DATABASE_URL` names a PostgreSQL server, a new database on it.
async fn fresh_database(dir: &std::path::Path) -> String {
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
            format!("{base}/{name}")
        }
        _ => format!("sqlite://{}?mode=rwc", dir.join("ozone.db").display()),
    }
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let database_url = fresh_database(dir.path()).await;
    spawn_app_on(database_url, dir, configure).await
}

/// Whether the suite runs on PostgreSQL (`OZONE_TEST_DATABASE_URL`).
pub fn on_postgres() -> bool {
    std::env::var("OZONE_TEST_DATABASE_URL").is_ok_and(|u| u.starts_with("postgres"))
}

impl TestApp {
    /// A second application instance on this app's database, as another replica would be,
    /// with its own settings.
    pub async fn replica_with(&self, configure: impl FnOnce(&mut Settings)) -> TestApp {
        let dir = tempfile::tempdir().expect("temp dir");
        spawn_app_on(self.database_url.clone(), dir, configure).await
    }
}

async fn spawn_app_on(
    database_url: String,
    dir: tempfile::TempDir,
    configure: impl FnOnce(&mut Settings),
) -> TestApp {
    let mut settings = Settings {
        http_addr: "127.0.0.1:0".into(),
        database_url: database_url.clone(),
        log: "warn".into(),
        ..Settings::default()
    };
    configure(&mut settings);
    let app = Application::build(settings).await.expect("app builds");
    let addr = app.http_addr();
    let metrics_addr = app.metrics_addr();
    let state = app.state();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestApp {
        addr,
        metrics_addr,
        base: format!("http://{addr}"),
        database_url,
        http: reqwest::Client::new(),
        state,
        stop: Some(stop),
        server: Some(server),
        _dir: dir,
    }
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    async fn from(resp: reqwest::Response) -> Reply {
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("response is not JSON (status {status}): {text}"));
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
        let dir = tempfile::tempdir().expect("temp dir");
        let moved = std::mem::replace(&mut self._dir, dir);
        StoppedApp {
            database_url: self.database_url.clone(),
            _dir: moved,
        }
    }
}

pub struct StoppedApp {
    pub database_url: String,
    _dir: tempfile::TempDir,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
