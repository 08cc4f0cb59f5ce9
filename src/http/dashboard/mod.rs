//! The staff dashboard: HTML pages and their script and style, built into the binary (no build
//! step, no CDN), and the live feed the pages listen to (`live`). Pages are static shells; the
//! script fills them from the staff API with the session cookie, so every query and rule stays
//! in the API. Anonymous visitors of a page are sent to `/login/`.
//!
//! Everything here is static, so each response is prepared once: gzipped, with a content hash
//! as its ETag. Assets are linked with that hash in their URL and cached for a year; pages are
//! revalidated on every visit.

pub mod live;

use std::{
    io::Write,
    sync::{Arc, OnceLock},
};

use poem::{
    handler,
    http::{header, HeaderMap, StatusCode, Uri},
    web::{Data, Path},
    Response, Route,
};
use sha2::{Digest, Sha256};

use crate::{domain::auth, http::staff::auth::COOKIE_NAME, state::AppState};

const LAYOUT: &str = include_str!("assets/layout.html");
const APP_JS: &[u8] = include_bytes!("assets/app.js");
const APP_CSS: &[u8] = include_bytes!("assets/app.css");

/// The pages: name (the script's `data-page`), title and body.
const PAGES: &[(&str, &str, &str)] = &[
    ("login", "Log in", include_str!("assets/login.html")),
    ("devices", "Devices", include_str!("assets/devices.html")),
    ("device", "Device", include_str!("assets/device.html")),
    ("machines", "Machines", include_str!("assets/machines.html")),
    ("logs", "Treatment logs", include_str!("assets/logs.html")),
    ("outlets", "Outlets", include_str!("assets/outlets.html")),
    ("stats", "Statistics", include_str!("assets/stats.html")),
];

/// One prepared response body.
struct Prepared {
    content_type: &'static str,
    etag: String,
    plain: Vec<u8>,
    gzipped: Vec<u8>,
}

impl Prepared {
    fn new(content_type: &'static str, plain: Vec<u8>) -> Prepared {
        let digest = Sha256::digest(&plain);
        let etag = format!("\"{}\"", hex::encode(&digest[..12]));
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        // Writing to a Vec cannot fail.
        let gzipped = encoder
            .write_all(&plain)
            .and_then(|_| encoder.finish())
            .unwrap_or_default();
        Prepared {
            content_type,
            etag,
            plain,
            gzipped,
        }
    }

    /// The body, gzipped when the client takes it, or 304 when it already has this version.
    fn respond(&self, headers: &HeaderMap, cache_control: &'static str) -> Response {
        let builder = Response::builder()
            .header(header::ETAG, self.etag.as_str())
            .header(header::CACHE_CONTROL, cache_control)
            .header(header::VARY, "Accept-Encoding")
            .header("X-Content-Type-Options", "nosniff");
        let known = headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|tags| tags.split(',').any(|t| t.trim() == self.etag));
        if known {
            return builder.status(StatusCode::NOT_MODIFIED).finish();
        }
        let builder = builder.content_type(self.content_type);
        if accepts_gzip(headers) && !self.gzipped.is_empty() {
            builder
                .header(header::CONTENT_ENCODING, "gzip")
                .body(self.gzipped.clone())
        } else {
            builder.body(self.plain.clone())
        }
    }
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
            name.eq_ignore_ascii_case("gzip") && !refused
        })
}

struct Site {
    script: Prepared,
    style: Prepared,
    pages: Vec<(&'static str, Prepared)>,
}

fn site() -> &'static Site {
    static SITE: OnceLock<Site> = OnceLock::new();
    SITE.get_or_init(|| {
        let script = Prepared::new("text/javascript; charset=utf-8", APP_JS.to_vec());
        let style = Prepared::new("text/css; charset=utf-8", APP_CSS.to_vec());
        let version = |p: &Prepared| p.etag.trim_matches('"').to_owned();
        let pages = PAGES
            .iter()
            .map(|(name, title, body)| {
                let html = LAYOUT
                    .replace("{{title}}", title)
                    .replace("{{page}}", name)
                    .replace(
                        "{{script}}",
                        &format!("/static/app.js?v={}", version(&script)),
                    )
                    .replace(
                        "{{style}}",
                        &format!("/static/app.css?v={}", version(&style)),
                    )
                    .replace("{{body}}", body);
                (
                    *name,
                    Prepared::new("text/html; charset=utf-8", html.into_bytes()),
                )
            })
            .collect();
        Site {
            script,
            style,
            pages,
        }
    })
}

/// Adds the pages and their assets to the server's routes.
pub fn mount(route: Route) -> Route {
    route
        .at("/", poem::get(home))
        .at("/login", poem::get(login))
        .at("/devices", poem::get(devices))
        .at("/devices/:device_id", poem::get(device))
        .at("/machines", poem::get(machines))
        .at("/machines/:id/logs", poem::get(logs))
        .at("/outlets", poem::get(outlets))
        .at("/stats", poem::get(stats))
        .at("/static/:name", poem::get(asset))
        .at("/api/stream", poem::get(live::stream))
}

#[handler]
fn home() -> Response {
    redirect("/devices/")
}

#[handler]
fn login(headers: &HeaderMap) -> Response {
    page("login", headers)
}

#[handler]
async fn devices(state: Data<&Arc<AppState>>, uri: &Uri, headers: &HeaderMap) -> Response {
    guarded(&state, uri, headers, "devices").await
}

#[handler]
async fn device(
    state: Data<&Arc<AppState>>,
    uri: &Uri,
    headers: &HeaderMap,
    _device_id: Path<String>,
) -> Response {
    guarded(&state, uri, headers, "device").await
}

#[handler]
async fn machines(state: Data<&Arc<AppState>>, uri: &Uri, headers: &HeaderMap) -> Response {
    guarded(&state, uri, headers, "machines").await
}

#[handler]
async fn logs(
    state: Data<&Arc<AppState>>,
    uri: &Uri,
    headers: &HeaderMap,
    _id: Path<i32>,
) -> Response {
    guarded(&state, uri, headers, "logs").await
}

#[handler]
async fn outlets(state: Data<&Arc<AppState>>, uri: &Uri, headers: &HeaderMap) -> Response {
    guarded(&state, uri, headers, "outlets").await
}

#[handler]
async fn stats(state: Data<&Arc<AppState>>, uri: &Uri, headers: &HeaderMap) -> Response {
    guarded(&state, uri, headers, "stats").await
}

/// `/static/app.js` and `/static/app.css`; the `v` query parameter only busts caches.
#[handler]
fn asset(name: Path<String>, headers: &HeaderMap) -> Response {
    let site = site();
    let prepared = match name.0.as_str() {
        "app.js" => &site.script,
        "app.css" => &site.style,
        _ => {
            return crate::http::error_response(StatusCode::NOT_FOUND, "not_found", "no such file")
        }
    };
    prepared.respond(headers, "public, max-age=31536000, immutable")
}

/// A page for signed-in users; anyone else is sent to log in and brought back afterwards.
async fn guarded(state: &AppState, uri: &Uri, headers: &HeaderMap, name: &str) -> Response {
    let signed_in = match session_token(headers) {
        Some(token) => auth::authenticate(&state.db, &state.auth, token)
            .await
            .is_ok(),
        None => false,
    };
    if !signed_in {
        let here = uri
            .path_and_query()
            .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned());
        let next: String = serde_urlencoded::to_string([("next", here)]).unwrap_or_default();
        return redirect(&format!("/login/?{next}"));
    }
    page(name, headers)
}

/// Pages load nothing from elsewhere and run no inline script: text that slipped into markup
/// still could not execute.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; \
object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

fn page(name: &str, headers: &HeaderMap) -> Response {
    match site().pages.iter().find(|(n, _)| *n == name) {
        Some((_, prepared)) => {
            let mut response = prepared.respond(headers, "private, no-cache");
            response.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                header::HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            );
            response
        }
        None => crate::http::error_response(StatusCode::NOT_FOUND, "not_found", "no such page"),
    }
}

fn redirect(to: &str) -> Response {
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, to)
        .header(header::CACHE_CONTROL, "no-store")
        .finish()
}

/// The staff JWT from the session cookie.
fn session_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.trim())
        .filter(|value| !value.is_empty())
}

/// The caller's credential: `Authorization: Bearer` or the session cookie.
pub(crate) fn credential(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    bearer.or_else(|| session_token(headers))
}
