//! Staff authentication: login by cookie or bearer, logout revocation, roles, deactivation,
//! tampered and expired tokens, throttling, registration and API tokens.

use reqwest::{header, Method};
use sea_orm::{sea_query::Expr, ColumnTrait, EntityTrait, QueryFilter};
use serde_json::json;

use crate::helpers::{spawn_app, spawn_app_with};

#[tokio::test]
async fn login_returns_the_user_and_a_jwt_also_set_as_a_strict_httponly_cookie() {
    let app = spawn_app().await;
    ozone::domain::users::create(
        &app.state.db,
        ozone::domain::users::NewUser {
            username: "admin".into(),
            password: "password123".into(),
            is_staff: true,
            is_superuser: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let resp = app
        .http
        .post(format!("{}/api/auth/login/", app.base))
        .json(&json!({"username": "admin", "password": "password123"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cookie = resp
        .headers()
        .get(header::SET_COOKIE)
        .expect("cookie")
        .to_str()
        .unwrap()
        .to_owned();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["success"], true);
    assert_eq!(body["user"]["username"], "admin");
    assert_eq!(body["user"]["is_superuser"], true);
    let token = body["token"].as_str().unwrap();
    assert_eq!(token.split('.').count(), 3, "a JWT");
    assert!(cookie.starts_with(&format!("ozone_token={token};")));
    assert!(cookie.contains("HttpOnly"));
    assert!(cookie.contains("SameSite=Strict"));

    // The cookie alone authenticates, like the seed's curl examples with a cookie jar.
    let user = app
        .http
        .get(format!("{}/api/auth/user/", app.base))
        .header(header::COOKIE, format!("ozone_token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(user.status(), 200);
    let user: serde_json::Value = user.json().await.unwrap();
    assert_eq!(user["user"]["username"], "admin");
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_the_same_401() {
    let app = spawn_app().await;
    app.user("someone", false, false).await;
    for username in ["someone", "nobody"] {
        let reply = app
            .staff_call(
                Method::POST,
                "/api/auth/login/",
                None,
                Some(&json!({"username": username, "password": "wrong password"})),
            )
            .await;
        reply.assert_error(401, "invalid_credentials");
    }
}

#[tokio::test]
async fn check_answers_200_for_anonymous_and_logged_in_callers() {
    let app = spawn_app().await;
    let anonymous = app
        .staff_call(Method::GET, "/api/auth/check/", None, None)
        .await;
    assert_eq!(anonymous.status, 200);
    assert_eq!(anonymous.body["authenticated"], false);
    let user = app.user("reader", false, false).await;
    let checked = app.staff_get("/api/auth/check/", &user).await;
    assert_eq!(checked.body["authenticated"], true);
    assert_eq!(checked.body["user"]["username"], "reader");
}

#[tokio::test]
async fn missing_tampered_and_revoked_tokens_are_401_with_their_codes() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    app.staff_call(Method::GET, "/api/auth/user/", None, None)
        .await
        .assert_error(401, "not_authenticated");

    let mut tampered = staff.token.clone();
    tampered.pop();
    tampered.push(if staff.token.ends_with('A') { 'B' } else { 'A' });
    app.staff_call(Method::GET, "/api/auth/user/", Some(&tampered), None)
        .await
        .assert_error(401, "invalid_token");
    app.staff_call(Method::GET, "/api/auth/user/", Some("not-a-jwt"), None)
        .await
        .assert_error(401, "invalid_token");

    let out = app
        .staff_call(Method::POST, "/api/auth/logout/", Some(&staff.token), None)
        .await;
    assert_eq!(out.status, 200, "{}", out.body);
    assert_eq!(out.body["success"], true);
    app.staff_get("/api/auth/user/", &staff)
        .await
        .assert_error(401, "token_revoked");
}

#[tokio::test]
async fn expired_token_is_401_token_expired() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let id = app.staff_get("/api/auth/user/", &staff).await.body["user"]["id"]
        .as_i64()
        .unwrap();
    let secret = ozone::db::entities::app_secret::Entity::find_by_id("jwt_hs256")
        .one(app.db())
        .await
        .unwrap()
        .expect("generated secret is stored");
    let past = chrono::Utc::now().timestamp() - 3600;
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": id.to_string(), "jti": "x", "iat": past - 60, "exp": past}),
        &jsonwebtoken::EncodingKey::from_secret(secret.value.as_bytes()),
    )
    .unwrap();
    app.staff_call(Method::GET, "/api/auth/user/", Some(&expired), None)
        .await
        .assert_error(401, "token_expired");
}

#[tokio::test]
async fn a_user_deactivated_after_login_is_refused_at_once() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    ozone::db::entities::user::Entity::update_many()
        .col_expr(
            ozone::db::entities::user::Column::IsActive,
            Expr::value(false),
        )
        .filter(ozone::db::entities::user::Column::Username.eq("staff"))
        .exec(app.db())
        .await
        .unwrap();
    app.staff_get("/api/auth/user/", &staff)
        .await
        .assert_error(401, "user_inactive");
    app.staff_call(
        Method::POST,
        "/api/auth/login/",
        None,
        Some(&json!({"username": "staff", "password": "correct horse battery"})),
    )
    .await
    .assert_error(401, "user_inactive");
}

#[tokio::test]
async fn sessions_survive_a_restart_because_the_generated_secret_is_stored() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let stopped = app.stop().await;
    let again = spawn_app_with(|s| s.database_url = stopped.database_url.clone()).await;
    let reply = again.staff_get("/api/auth/user/", &staff).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[tokio::test]
async fn login_attempts_are_throttled_with_retry_after() {
    let app = spawn_app_with(|s| s.login_attempts_per_minute = 3).await;
    let mut last = None;
    for _ in 0..4 {
        let resp = app
            .http
            .post(format!("{}/api/auth/login/", app.base))
            .json(&json!({"username": "ghost", "password": "whatever1"}))
            .send()
            .await
            .unwrap();
        last = Some(resp);
    }
    let resp = last.unwrap();
    assert_eq!(resp.status(), 429);
    let retry_after: u64 = resp.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
}

#[tokio::test]
async fn registration_is_staff_only_unless_open() {
    let app = spawn_app().await;
    let new = json!({"username": "newuser", "password": "password123", "email": "u@example.com"});
    app.staff_call(Method::POST, "/api/auth/register/", None, Some(&new))
        .await
        .assert_error(401, "not_authenticated");
    let reader = app.user("reader", false, false).await;
    app.staff_post("/api/auth/register/", &reader, &new)
        .await
        .assert_error(403, "staff_required");
    let staff = app.staff().await;
    let created = app.staff_post("/api/auth/register/", &staff, &new).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.body["user"]["username"], "newuser");
    assert_eq!(created.body["user"]["is_staff"], false);
    app.staff_post(
        "/api/auth/register/",
        &staff,
        &json!({"username": "boss", "password": "password123", "is_staff": true}),
    )
    .await
    .assert_error(403, "superuser_required");
    app.staff_post(
        "/api/auth/register/",
        &staff,
        &json!({"username": "short", "password": "short"}),
    )
    .await
    .assert_error(422, "weak_password");

    let open = spawn_app_with(|s| s.open_registration = true).await;
    let created = open
        .staff_call(Method::POST, "/api/auth/register/", None, Some(&new))
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
}

#[tokio::test]
async fn api_tokens_are_shown_once_scoped_and_revocable() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let created = app
        .staff_post(
            "/api/auth/tokens/",
            &staff,
            &json!({"name": "dashboard", "scope": "read"}),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let token = created.body["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("ozt_"));
    let id = created.body["id"].as_i64().unwrap();

    let me = app
        .staff_call(Method::GET, "/api/auth/user/", Some(&token), None)
        .await;
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.body["user"]["username"], "staff");
    // A read-only token cannot act as staff.
    app.staff_call(
        Method::POST,
        "/api/auth/tokens/",
        Some(&token),
        Some(&json!({"name": "escalate", "scope": "staff"})),
    )
    .await
    .assert_error(403, "read_only_token");

    let listed = app.staff_get("/api/auth/tokens/", &staff).await;
    assert_eq!(listed.body["count"], 1);
    assert!(listed.body["results"][0].get("token").is_none());

    let revoked = app
        .staff_call(
            Method::DELETE,
            &format!("/api/auth/tokens/{id}/"),
            Some(&staff.token),
            None,
        )
        .await;
    assert_eq!(revoked.status, 204);
    app.staff_call(Method::GET, "/api/auth/user/", Some(&token), None)
        .await
        .assert_error(401, "token_revoked");
}

#[tokio::test]
async fn superusers_administer_users_and_changes_take_effect_at_once() {
    let app = spawn_app().await;
    let root = app.user("root", true, true).await;
    let staff = app.staff().await;
    let reader = app.user("reader", false, false).await;

    // Only superusers see or change accounts.
    app.staff_get("/api/auth/users/", &staff)
        .await
        .assert_error(403, "superuser_required");
    app.staff_call(Method::GET, "/api/auth/users/", None, None)
        .await
        .assert_error(401, "not_authenticated");
    let list = app.staff_get("/api/auth/users/?limit=2", &root).await;
    assert_eq!(list.status, 200, "{}", list.body);
    assert_eq!(list.body["count"], 3);
    let names: Vec<&str> = list.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["root", "staff"]);
    assert!(list.body["next"].as_str().unwrap().contains("offset=2"));
    let reader_id = app.staff_get("/api/auth/users/?offset=2", &root).await.body["results"][0]
        ["id"]
        .as_i64()
        .unwrap();
    app.staff_get("/api/auth/users/999999/", &root)
        .await
        .assert_error(404, "user_not_found");

    // Promote the reader to staff: its existing token now may mutate.
    let path = format!("/api/auth/users/{reader_id}/");
    let promoted = app
        .staff_call(
            Method::PATCH,
            &path,
            Some(&root.token),
            Some(&json!({"is_staff": true, "first_name": "Rea"})),
        )
        .await;
    assert_eq!(promoted.status, 200, "{}", promoted.body);
    assert_eq!(promoted.body["is_staff"], true);
    assert_eq!(promoted.body["first_name"], "Rea");
    let outlet = app
        .staff_post("/api/outlets/", &reader, &json!({"name": "Promoted"}))
        .await;
    assert_eq!(outlet.status, 201, "{}", outlet.body);

    // A weak password is refused; a new password ends the user's sessions.
    app.staff_call(
        Method::PATCH,
        &path,
        Some(&root.token),
        Some(&json!({"password": "short"})),
    )
    .await
    .assert_error(422, "weak_password");
    let reset = app
        .staff_call(
            Method::PATCH,
            &path,
            Some(&root.token),
            Some(&json!({"password": "a brand new password"})),
        )
        .await;
    assert_eq!(reset.status, 200, "{}", reset.body);
    app.staff_get("/api/auth/user/", &reader)
        .await
        .assert_error(401, "token_revoked");
    let login = app
        .staff_call(
            Method::POST,
            "/api/auth/login/",
            None,
            Some(&json!({"username": "reader", "password": "a brand new password"})),
        )
        .await;
    assert_eq!(login.status, 200, "{}", login.body);

    // Deactivation refuses the user's tokens at once.
    let deactivated = app
        .staff_call(
            Method::PATCH,
            &path,
            Some(&root.token),
            Some(&json!({"is_active": false})),
        )
        .await;
    assert_eq!(deactivated.status, 200, "{}", deactivated.body);
    let token = login.body["token"].as_str().unwrap();
    app.staff_call(Method::GET, "/api/auth/user/", Some(token), None)
        .await
        .assert_error(401, "token_revoked");
    app.staff_call(
        Method::POST,
        "/api/auth/login/",
        None,
        Some(&json!({"username": "reader", "password": "a brand new password"})),
    )
    .await
    .assert_error(401, "user_inactive");

    // The last active superuser cannot lock everyone out.
    let root_id = app.staff_get("/api/auth/user/", &root).await.body["user"]["id"]
        .as_i64()
        .unwrap();
    let root_path = format!("/api/auth/users/{root_id}/");
    app.staff_call(
        Method::PATCH,
        &root_path,
        Some(&root.token),
        Some(&json!({"is_superuser": false})),
    )
    .await
    .assert_error(409, "last_superuser");
    app.staff_call(
        Method::PATCH,
        &root_path,
        Some(&root.token),
        Some(&json!({"is_active": false})),
    )
    .await
    .assert_error(409, "last_superuser");
    let still = app.staff_get("/api/auth/user/", &root).await;
    assert_eq!(still.body["user"]["is_superuser"], true);
}

#[tokio::test]
async fn users_change_their_own_password_and_other_sessions_end() {
    let app = spawn_app().await;
    let first = app.staff().await;
    let second = app
        .staff_call(
            Method::POST,
            "/api/auth/login/",
            None,
            Some(&json!({"username": "staff", "password": "correct horse battery"})),
        )
        .await;
    let second = second.body["token"].as_str().unwrap().to_owned();

    app.staff_post(
        "/api/auth/password/",
        &first,
        &json!({"current_password": "wrong one!", "new_password": "another long one"}),
    )
    .await
    .assert_error(422, "wrong_password");
    let changed = app
        .staff_post(
            "/api/auth/password/",
            &first,
            &json!({"current_password": "correct horse battery", "new_password": "another long one"}),
        )
        .await;
    assert_eq!(changed.status, 200, "{}", changed.body);
    // The session that made the change stays; the other one ends.
    assert_eq!(app.staff_get("/api/auth/user/", &first).await.status, 200);
    app.staff_call(Method::GET, "/api/auth/user/", Some(&second), None)
        .await
        .assert_error(401, "token_revoked");
    app.staff_call(
        Method::POST,
        "/api/auth/login/",
        None,
        Some(&json!({"username": "staff", "password": "correct horse battery"})),
    )
    .await
    .assert_error(401, "invalid_credentials");
}

#[tokio::test]
async fn a_forged_cookie_beside_a_valid_bearer_token_is_refused() {
    let app = spawn_app().await;
    let staff = app.staff().await;
    let resp = app
        .http
        .get(format!("{}/api/auth/user/", app.base))
        .bearer_auth(&staff.token)
        .header(header::COOKIE, "ozone_token=forged")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let both = app
        .http
        .get(format!("{}/api/auth/user/", app.base))
        .bearer_auth(&staff.token)
        .header(header::COOKIE, format!("ozone_token={}", staff.token))
        .send()
        .await
        .unwrap();
    assert_eq!(both.status(), 200);
}
