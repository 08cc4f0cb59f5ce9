//! The OpenAPI spec: served, checked in, and complete.

use serde_json::Value;

use crate::helpers::spawn_app;

const REGENERATE: &str = "cargo run -- openapi > openapi/openapi.json";

#[tokio::test]
async fn checked_in_spec_equals_the_served_spec() {
    let app = spawn_app().await;
    let served: Value = app
        .http
        .get(format!("{}/openapi.json", app.base))
        .send()
        .await
        .expect("GET /openapi.json")
        .json()
        .await
        .expect("spec is JSON");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
    let checked_in: Value = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(Value::Null);
    assert!(
        served == checked_in,
        "openapi/openapi.json differs from the spec the server serves; regenerate it with `{REGENERATE}`"
    );
}

#[tokio::test]
async fn spec_is_served_as_yaml_and_swagger_ui_persists_authorization() {
    let app = spawn_app().await;
    let yaml = app
        .http
        .get(format!("{}/openapi.yaml/", app.base))
        .send()
        .await
        .expect("GET /openapi.yaml");
    assert_eq!(yaml.status(), 200);
    assert!(yaml.text().await.expect("body").contains("openapi: 3.0.0"));
    let docs = app
        .http
        .get(format!("{}/docs/", app.base))
        .send()
        .await
        .expect("GET /docs");
    assert_eq!(docs.status(), 200);
    assert!(docs
        .text()
        .await
        .expect("body")
        .contains("persistAuthorization: true"));
}

#[tokio::test]
async fn spec_documents_firmware_contract_security_schemes_and_errors() {
    let spec: Value = serde_json::from_str(&ozone::http::staff::spec_json()).expect("JSON");
    for scheme in ["cookieAuth", "bearerAuth", "deviceToken"] {
        assert!(
            spec["components"]["securitySchemes"][scheme].is_object(),
            "missing security scheme {scheme}"
        );
    }
    let paths = spec["paths"].as_object().expect("paths");
    let events = &paths["/api/events"];
    assert!(events["post"]["tags"][0] == "Firmware", "{events}");
    assert!(paths.contains_key("/api/handshake"));
    // Every operation declares its error responses with the one error body.
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|k| k.starts_with('4')),
                "{method} {path} declares no 4xx response"
            );
            assert!(op["operationId"].is_string(), "{method} {path} has no id");
        }
    }
}

#[tokio::test]
async fn a_wrong_method_is_405_with_the_allowed_methods() {
    let app = spawn_app().await;
    for (method, path, allowed) in [
        ("TRACE", "/api/devices/", "GET, HEAD"),
        ("PUT", "/api/commands/bulk/", "POST"),
        ("DELETE", "/api/handshake", "POST"),
    ] {
        let resp = app
            .http
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{path}", app.base),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "{method} {path}");
        assert_eq!(resp.headers()["allow"], allowed, "{method} {path}");
    }
}

#[tokio::test]
async fn the_spec_has_both_operations_of_a_shared_path() {
    let app = spawn_app().await;
    let spec: serde_json::Value = app
        .http
        .get(format!("{}/openapi.json", app.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events = spec["paths"]["/api/events"].as_object().unwrap();
    assert!(events.contains_key("get"), "the staff list");
    assert!(events.contains_key("post"), "the firmware upload");
}
