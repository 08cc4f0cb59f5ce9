//! The operator command line, run as the real binary against the test database.

use serde_json::Value;

use crate::helpers::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_assign_creates_the_missing_machine_and_outlet() {
    let app = spawn_app().await;
    let d = app.handshake("3C:8A:1F:A4:22:D4").await;
    let out: Value = serde_json::from_str(&app.admin(&[
        "device",
        "assign",
        &d.device_id,
        "--machine",
        "CH1/027/2024",
        "--outlet",
        "Grand Mall",
    ]))
    .unwrap();
    assert_eq!(out["assigned"], true);
    assert_eq!(out["machine"]["machine_code"], "CH1/027/2024");
    assert_eq!(out["machine"]["created"], true);
    assert_eq!(out["outlet"]["created"], true);
    // Again: nothing new is created.
    let again: Value = serde_json::from_str(&app.admin(&[
        "device",
        "assign",
        &d.device_id,
        "--machine",
        "CH1/027/2024",
        "--outlet",
        "Grand Mall",
    ]))
    .unwrap();
    assert_eq!(again["machine"]["created"], false);
    assert_eq!(again["outlet"]["created"], false);
    assert_eq!(app.poll(&d).await.status, 200, "the device may poll now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_can_be_assigned_before_its_first_handshake() {
    let app = spawn_app().await;
    app.admin(&["device", "assign", "aa-bb-cc-dd-ee-ff", "--machine", "M-9"]);
    let d = app.handshake("AA:BB:CC:DD:EE:FF").await;
    let reply = app
        .post_json(
            "/api/handshake/",
            Some(&d.token),
            &serde_json::json!({"mac": "AA:BB:CC:DD:EE:FF"}),
        )
        .await;
    assert_eq!(reply.body["assigned"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_device_frees_its_old_machine() {
    let app = spawn_app().await;
    let a = app.handshake("EC:E3:34:46:2B:C0").await;
    let b = app.handshake("EC:E3:34:46:2B:C1").await;
    app.admin(&["device", "assign", &a.device_id, "--machine", "M-1"]);
    // B takes M-1: A is unassigned (one device per machine).
    app.admin(&["device", "assign", &b.device_id, "--machine", "M-1"]);
    app.poll(&a).await.assert_error(401, "device_unassigned");
    assert_eq!(app.poll(&b).await.status, 200);
    app.admin(&["device", "unassign", &b.device_id]);
    app.poll(&b).await.assert_error(401, "device_unassigned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_may_spell_a_mac_device_id_any_way() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    app.admin(&["device", "assign", "ec-e3-34-46-2b-c0", "--machine", "M-1"]);
    let out: Value =
        serde_json::from_str(&app.admin(&["command", "send", "ece334462bc0", "REBOOT"])).unwrap();
    assert_eq!(out["status"], "pending");
    assert_eq!(out["device_id"], "EC:E3:34:46:2B:C0");
    let polled = app.poll(&d).await;
    assert_eq!(polled.body["commands"][0]["command_id"], out["command_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_send_rejects_bad_input_with_a_message() {
    let app = spawn_app().await;
    let d = app.handshake("EC:E3:34:46:2B:C0").await;
    let (ok, _, err) = app.try_admin(&[
        "command",
        "send",
        &d.device_id,
        "RESET",
        "--payload",
        "{oops",
    ]);
    assert!(!ok);
    assert!(err.contains("--payload is not valid JSON"), "{err}");
    let (ok, _, err) = app.try_admin(&["command", "send", "no-such-device", "RESET"]);
    assert!(!ok);
    assert!(err.contains("not found"), "{err}");
    let (ok, _, err) = app.try_admin(&["command", "send", &d.device_id, "rm -rf"]);
    assert!(!ok);
    assert!(err.contains("command_type"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn createsuperuser_works_without_a_terminal_when_flags_are_given() {
    let app = spawn_app().await;
    let out = app.admin(&[
        "createsuperuser",
        "--username",
        "admin",
        "--password",
        "s3cret-pass",
        "--email",
        "a@example.com",
    ]);
    assert!(out.contains("admin"));
    let user = {
        use sea_orm::EntityTrait;
        ozone::db::entities::user::Entity::find()
            .one(app.db())
            .await
            .unwrap()
            .unwrap()
    };
    assert!(user.is_superuser && user.is_staff && user.is_active);
    assert!(ozone::domain::users::verify_password(
        "s3cret-pass",
        &user.password_hash
    ));
    assert!(!user.password_hash.contains("s3cret-pass"));
    let (ok, _, err) = app.try_admin(&[
        "createsuperuser",
        "--username",
        "admin",
        "--password",
        "another-pass",
    ]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = app.try_admin(&["createsuperuser", "--username", "bob"]);
    assert!(!ok && err.contains("--password"), "{err}");
    let (ok, _, err) = app.try_admin(&[
        "createsuperuser",
        "--username",
        "bob",
        "--password",
        "short",
    ]);
    assert!(!ok && err.contains("at least"), "{err}");
}

#[test]
fn settings_layer_file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file_db = dir.path().join("from-file.db");
    let env_db = dir.path().join("from-env.db");
    let flag_db = dir.path().join("from-flag.db");
    let config = dir.path().join("ozone.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = \"sqlite://{}?mode=rwc\"\n",
            file_db.display()
        ),
    )
    .unwrap();
    let run = |env_db: Option<&std::path::Path>, flag: Option<&std::path::Path>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ozone"));
        cmd.env_remove("DATABASE_URL").env("OZONE_CONFIG", &config);
        if let Some(p) = env_db {
            cmd.env("DATABASE_URL", format!("sqlite://{}?mode=rwc", p.display()));
        }
        cmd.arg("migrate");
        if let Some(p) = flag {
            cmd.arg("--database-url")
                .arg(format!("sqlite://{}?mode=rwc", p.display()));
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(None, None);
    assert!(file_db.exists(), "the file's database_url applies");
    run(Some(&env_db), None);
    assert!(env_db.exists(), "DATABASE_URL overrides the file");
    run(Some(&env_db), Some(&flag_db));
    assert!(flag_db.exists(), "--database-url overrides the environment");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ozone"))
        .args(["migrate", "--config", "/nonexistent/ozone.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn database_passwords_never_reach_the_logs() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ozone"))
        .args([
            "migrate",
            "--database-url",
            "postgres://ozone:hunter2-secret@127.0.0.1:1/ozone",
        ])
        .env("OZONE_LOG", "debug")
        .output()
        .unwrap();
    assert!(!out.status.success(), "nothing listens on port 1");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("hunter2-secret"), "{all}");
    assert!(all.contains("ozone:***@"), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn createsuperuser_asks_for_missing_values_on_a_terminal() {
    use std::io::Write;
    let app = spawn_app().await;
    // util-linux `script` gives the command a pseudo-terminal fed from our stdin.
    let command = format!(
        "{} --database-url '{}' createsuperuser",
        env!("CARGO_BIN_EXE_ozone"),
        app.database_url
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("OZONE_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("util-linux `script` is needed for this test");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"alice\nalice@example.com\nwonderland1\nwonderland1\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains("Password"), "it prompted: {printed}");
    assert!(printed.contains("superuser `alice` created"), "{printed}");
    use sea_orm::EntityTrait;
    let user = ozone::db::entities::user::Entity::find()
        .one(app.db())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(user.email, "alice@example.com");
    assert!(ozone::domain::users::verify_password(
        "wonderland1",
        &user.password_hash
    ));
}
