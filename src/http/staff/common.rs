//! What every staff operation shares: the error response (the domain error mapped once, every
//! status declared in the spec), the DRF-style page `{count, next, previous, results}` and its
//! `limit`/`offset` window.

use poem::Request;
use poem_openapi::{
    payload::Json,
    types::{ParseError, ParseFromJSON, ParseResult, ToJSON},
    ApiResponse, Object,
};
use serde_json::Value;

use crate::{
    domain::queries::{self, PageRequest},
    error::Error,
    http::error::parts,
};

/// Every error: a human title, a stable machine-readable `code` and a detail.
#[derive(Debug, Clone, Object)]
pub struct ErrorBody {
    /// The HTTP reason phrase, e.g. `Not Found`.
    pub error: String,
    /// Stable machine-readable code, e.g. `machine_not_found`.
    pub code: String,
    /// What went wrong, for people.
    pub detail: String,
}

/// The errors a staff operation can answer with.
#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// The request could not be read (malformed JSON, a parameter of the wrong type).
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No valid credential: missing, invalid, expired or revoked token, or a deactivated user.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// The credential is valid but lacks the role this needs.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// An id in the path or body names nothing.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The request conflicts with the current state (e.g. a device bound elsewhere).
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// The request body is larger than the server accepts.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// The request body is not JSON (`Content-Type` must be `application/json`).
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// The body parsed but breaks a rule.
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// Too many attempts; `Retry-After` says when to try again (seconds).
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>, #[oai(header = "Retry-After")] Option<u64>),
    /// An internal error; it has been logged.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// The service is shutting down.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        let (status, code, detail) = parts(&err);
        let body = Json(ErrorBody {
            error: status.canonical_reason().unwrap_or("Error").to_owned(),
            code: code.to_owned(),
            detail,
        });
        match status.as_u16() {
            400 => ApiError::BadRequest(body),
            401 => ApiError::Unauthorized(body),
            403 => ApiError::Forbidden(body),
            404 => ApiError::NotFound(body),
            409 => ApiError::Conflict(body),
            413 => ApiError::PayloadTooLarge(body),
            415 => ApiError::UnsupportedMediaType(body),
            422 => ApiError::Unprocessable(body),
            429 => ApiError::TooManyRequests(
                body,
                match err {
                    Error::RateLimited {
                        retry_after_secs, ..
                    } => Some(retry_after_secs),
                    _ => None,
                },
            ),
            503 => ApiError::Unavailable(body),
            _ => ApiError::Internal(body),
        }
    }
}

/// A text field of a request body: a JSON string only (poem-openapi alone would also take
/// `false` or `42` and store "false" or "42").
pub fn text(value: Option<Value>) -> ParseResult<String> {
    match value {
        Some(Value::String(s)) => Ok(s),
        other => Err(ParseError::expected_type(other.unwrap_or_default())),
    }
}

/// An optional text field of a request body: a JSON string, `null` or absent.
pub fn optional_text(value: Option<Value>) -> ParseResult<Option<String>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ParseError::expected_type(other)),
    }
}

/// One page of a list, in the shape DRF clients know.
#[derive(Debug, Clone, Object)]
pub struct Page<T: ParseFromJSON + ToJSON> {
    /// Items in the whole list.
    pub count: u64,
    /// The next page (path and query), or null on the last page.
    #[oai(nullable)]
    pub next: Option<String>,
    /// The previous page, or null on the first page.
    #[oai(nullable)]
    pub previous: Option<String>,
    pub results: Vec<T>,
}

/// Validates `limit` (1-1000, default 50) and `offset` (≥ 0) query parameters.
pub fn page_request(limit: Option<i64>, offset: Option<i64>) -> Result<PageRequest, ApiError> {
    Ok(PageRequest::new(limit, offset)?)
}

impl<T: ParseFromJSON + ToJSON> Page<T> {
    /// Builds the page from a domain page, with `next`/`previous` links relative to the
    /// request's own path and query.
    pub fn from_domain<D>(
        req: &Request,
        page: queries::Page<D>,
        convert: impl FnMut(D) -> T,
    ) -> Self {
        let PageRequest { limit, offset } = page.request;
        let link = |offset: u64| -> String {
            let mut pairs: Vec<(String, String)> = req
                .uri()
                .query()
                .map(|q| serde_urlencoded::from_str(q).unwrap_or_default())
                .unwrap_or_default();
            pairs.retain(|(k, _)| k != "limit" && k != "offset");
            pairs.push(("limit".into(), limit.to_string()));
            pairs.push(("offset".into(), offset.to_string()));
            let query = serde_urlencoded::to_string(&pairs).unwrap_or_default();
            format!("{}?{query}", req.uri().path())
        };
        let next = (offset + limit < page.count).then(|| link(offset + limit));
        let previous = (offset > 0).then(|| link(offset.saturating_sub(limit)));
        Page {
            count: page.count,
            next,
            previous,
            results: page.items.into_iter().map(convert).collect(),
        }
    }
}

/// A delete's answer.
#[derive(ApiResponse)]
pub enum Deleted {
    /// Deleted.
    #[oai(status = 204)]
    Done,
}
