//! Cross-site request forgery: the session cookie is SameSite=Strict, so browsers do not send
//! it with requests started by other sites; in addition, a state-changing request that carries
//! the cookie (and no `Authorization` header, which no browser adds by itself) is refused when
//! the browser says it comes from another origin (`Origin`, or `Sec-Fetch-Site: cross-site`)
//! not listed in `cors_allowed_origins`. Clients that are not browsers send no `Origin` and are
//! not affected.

use std::sync::Arc;

use poem::{
    http::{header, HeaderMap, Method, StatusCode},
    Endpoint, IntoResponse, Request, Response,
};

use crate::{http::error_response, http::staff::auth::COOKIE_NAME, state::AppState};

pub async fn same_origin<E: Endpoint>(
    endpoint: Arc<E>,
    request: Request,
) -> poem::Result<Response> {
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    );
    if !safe && carries_session(request.headers()) && !from_allowed_origin(&request) {
        return Ok(error_response(
            StatusCode::FORBIDDEN,
            "cross_origin_request",
            "a request with the session cookie must come from this site's own pages",
        ));
    }
    endpoint
        .call(request)
        .await
        .map(IntoResponse::into_response)
}

fn carries_session(headers: &HeaderMap) -> bool {
    !headers.contains_key(header::AUTHORIZATION)
        && headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .any(|pair| pair.trim().split('=').next() == Some(COOKIE_NAME))
}

fn from_allowed_origin(request: &Request) -> bool {
    let headers = request.headers();
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        // No Origin: a non-browser client, or an old browser's same-origin request.
        return headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_none_or(|site| site != "cross-site");
    };
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    let hosts = [header::HOST.as_str(), "x-forwarded-host"];
    let own = authority.is_some_and(|authority| {
        hosts.iter().any(|name| {
            headers
                .get(*name)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|host| host.eq_ignore_ascii_case(authority))
        })
    });
    own || request.data::<Arc<AppState>>().is_some_and(|state| {
        state
            .settings
            .cors_allowed_origins
            .iter()
            .any(|allowed| allowed == origin)
    })
}
