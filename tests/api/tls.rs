//! HTTPS without a proxy: the same routes over TLS with a certificate from a CA made here, and
//! a new certificate taken up on SIGHUP without a restart.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};

use crate::helpers::{spawn_app_with, TestApp};

/// A CA and a `localhost` certificate it signed; returns the CA's PEM. Subject names differ
/// (OpenSSL, which Mosquitto's clients use, takes a leaf named like its issuer for self-signed).
pub fn issue(cert: &Path, key: &Path) -> String {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "Ozone test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().expect("leaf key");
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf = leaf
        .signed_by(&leaf_key, &issuer)
        .expect("leaf certificate");
    std::fs::write(cert, leaf.pem()).expect("write certificate");
    std::fs::write(key, leaf_key.serialize_pem()).expect("write key");
    ca_cert.pem()
}

fn client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA"))
        .resolve("localhost", "127.0.0.1:0".parse().expect("address"))
        .build()
        .expect("client")
}

fn https(app: &TestApp, path: &str) -> String {
    let port = app.https_addr.expect("an HTTPS listener").port();
    format!("https://localhost:{port}{path}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_the_same_routes_and_reloads_its_certificate_on_sighup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let first_ca = issue(&cert, &key);
    let app = spawn_app_with(|s| {
        s.https_addr = Some("127.0.0.1:0".into());
        s.tls_cert = Some(cert.display().to_string());
        s.tls_key = Some(key.display().to_string());
    })
    .await;

    let trusting_first = client(&first_ca);
    let resp = trusting_first
        .get(https(&app, "/healthz"))
        .send()
        .await
        .expect("HTTPS request");
    assert_eq!(resp.status(), 200);
    let resp = trusting_first
        .post(https(&app, "/api/handshake/"))
        .json(&serde_json::json!({ "mac": "02:00:00:00:30:01" }))
        .send()
        .await
        .expect("HTTPS handshake");
    assert_eq!(resp.status(), 200);
    // Plain HTTP keeps working beside it (field firmware speaks HTTP).
    assert_eq!(app.get("/healthz", None).await.status, 200);

    // A renewed certificate from another CA, announced with SIGHUP.
    let second_ca = issue(&cert, &key);
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(sent.success());
    let trusting_second = client(&second_ca);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match trusting_second.get(https(&app, "/healthz")).send().await {
            Ok(resp) => {
                assert_eq!(resp.status(), 200);
                break;
            }
            Err(err) if Instant::now() > deadline => panic!("new certificate not served: {err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    // New connections get the new certificate only.
    let fresh_first = client(&first_ca);
    assert!(fresh_first
        .get(https(&app, "/healthz"))
        .send()
        .await
        .is_err());
}

#[tokio::test]
async fn an_unreadable_certificate_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = ozone::Settings {
        http_addr: "127.0.0.1:0".into(),
        database_url: format!("sqlite://{}?mode=rwc", dir.path().join("o.db").display()),
        // This test needs no broker (and must not hold port 1883).
        mqtt_addr: String::new(),
        https_addr: Some("127.0.0.1:0".into()),
        tls_cert: Some(dir.path().join("missing.pem").display().to_string()),
        tls_key: Some(dir.path().join("missing.key").display().to_string()),
        ..ozone::Settings::default()
    };
    let err = ozone::Application::build(settings.clone())
        .await
        .err()
        .expect("no start without a certificate");
    assert!(format!("{err:#}").contains("missing.pem"), "{err:#}");
    settings.tls_key = None;
    assert!(ozone::Application::build(settings).await.is_err());
}
