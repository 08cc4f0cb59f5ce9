//! Maps the domain error to HTTP, once: status, and a JSON body `{error, code, detail}`.

use poem::{http::StatusCode, web::Json, IntoResponse, Response};
use serde_json::json;

use crate::error::Error;

pub(crate) fn status_of(err: &Error) -> StatusCode {
    match err {
        Error::MissingToken
        | Error::InvalidToken
        | Error::DeviceMismatch(_)
        | Error::DeviceUnassigned(_)
        | Error::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
        Error::HandshakeRefused(_) | Error::Forbidden { .. } => StatusCode::FORBIDDEN,
        Error::NotFound { .. } => StatusCode::NOT_FOUND,
        Error::Malformed { .. } => StatusCode::BAD_REQUEST,
        Error::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        Error::Conflict { .. } => StatusCode::CONFLICT,
        Error::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        Error::Database(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub fn error_response(status: StatusCode, code: &str, detail: &str) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    let mut resp = (
        status,
        Json(json!({ "error": title, "code": code, "detail": detail })),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            poem::http::header::WWW_AUTHENTICATE,
            poem::http::HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

/// The status, code and client-facing detail of an error. Internals are logged here, never
/// sent.
pub(crate) fn parts(err: &Error) -> (StatusCode, &'static str, String) {
    let status = status_of(err);
    if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
        tracing::error!(error = %err, "request failed");
        return (
            status,
            err.code(),
            "an internal error occurred; it has been logged".to_owned(),
        );
    }
    (status, err.code(), err.to_string())
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code, detail) = parts(&self);
        let mut resp = error_response(status, code, &detail);
        if let Error::RateLimited {
            retry_after_secs, ..
        } = self
        {
            resp.headers_mut()
                .insert(poem::http::header::RETRY_AFTER, retry_after_secs.into());
        }
        resp
    }
}

impl From<Error> for poem::Error {
    fn from(err: Error) -> Self {
        poem::Error::from_response(err.into_response())
    }
}

/// Turns poem's own errors (unknown path, wrong method, unreadable body) into the same JSON
/// shape.
pub async fn from_poem(err: poem::Error) -> Response {
    if err.is_from_response() {
        return err.into_response();
    }
    if let Some(invalid) = out_of_bounds(&err) {
        return invalid;
    }
    let status = err.status();
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::UNAUTHORIZED => "not_authenticated",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal_error",
        _ => "error",
    };
    if status.is_server_error() {
        tracing::error!(error = %err, "request failed");
        return error_response(
            status,
            code,
            "an internal error occurred; it has been logged",
        );
    }
    error_response(status, code, &err.to_string())
}

/// A value of the right type outside the bounds the spec declares (`limit=5000`,
/// `expires_in: 0`) breaks a rule like any other: 422 with `invalid_<name>`, as the domain
/// answers for the same values.
fn out_of_bounds(err: &poem::Error) -> Option<Response> {
    use poem_openapi::error::{ParseParamError, ParseRequestPayloadError};
    const MARK: &str = "verification failed";
    let (name, detail) = if let Some(e) = err.downcast_ref::<ParseParamError>() {
        (e.name.to_owned(), e.reason.clone())
    } else if let Some(e) = err.downcast_ref::<ParseRequestPayloadError>() {
        let field = e.reason.split('`').nth(1)?;
        (field.to_owned(), e.reason.clone())
    } else {
        return None;
    };
    if !detail.contains(MARK)
        || name.is_empty()
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return None;
    }
    let code: &'static str = match name.as_str() {
        "limit" => "invalid_limit",
        "offset" => "invalid_offset",
        "days" => "invalid_days",
        "expires_in" => "invalid_expiry",
        _ => "invalid_field",
    };
    Some(error_response(
        StatusCode::UNPROCESSABLE_ENTITY,
        code,
        &format!("`{name}` is out of range ({detail})"),
    ))
}
