//! The one error type of the domain layer. Each transport maps it once: HTTP in
//! `http::error`, and later MQTT acknowledgements.

use sea_orm::DbErr;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a lookup did not find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    Device,
    Command,
    Machine,
    Outlet,
    User,
    ApiToken,
}

impl Entity {
    pub fn name(self) -> &'static str {
        match self {
            Entity::Device => "device",
            Entity::Command => "command",
            Entity::Machine => "machine",
            Entity::Outlet => "outlet",
            Entity::User => "user",
            Entity::ApiToken => "API token",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no bearer token was presented")]
    MissingToken,
    #[error("the bearer token is not valid")]
    InvalidToken,
    #[error("the token does not belong to device `{0}`")]
    DeviceMismatch(String),
    #[error("device `{0}` is not assigned to a machine yet")]
    DeviceUnassigned(String),
    #[error("device `{0}` is assigned; re-handshake without its current token is refused until an admin resets it")]
    HandshakeRefused(String),
    #[error("{} `{id}` was not found", .entity.name())]
    NotFound { entity: Entity, id: String },
    /// A body that could not be read as the expected format.
    #[error("{detail}")]
    Malformed { code: &'static str, detail: String },
    /// Input that parsed but breaks a rule; `code` is stable and machine-readable.
    #[error("{detail}")]
    Invalid { code: &'static str, detail: String },
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String },
    /// Refused by policy whoever asks (a setting, an address not allowed), or an
    /// authenticated staff user without the role an action needs.
    #[error("{detail}")]
    Forbidden { code: &'static str, detail: String },
    /// A staff credential that is missing, invalid, expired, revoked or whose user is
    /// deactivated; `code` says which.
    #[error("{detail}")]
    Unauthenticated { code: &'static str, detail: String },
    #[error("the service is shutting down")]
    Unavailable,
    /// An abuse limit refused the request; `limit` names it in logs and metrics.
    #[error("too many {what}; retry in {retry_after_secs} s")]
    RateLimited {
        limit: &'static str,
        what: &'static str,
        retry_after_secs: u64,
    },
    #[error("database error: {0}")]
    Database(DbErr),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<DbErr> for Error {
    /// A unique constraint that refuses a write is a conflict with what another request did
    /// at the same moment (two assignments of one machine, say), not a server fault.
    fn from(err: DbErr) -> Self {
        match err.sql_err() {
            Some(sea_orm::SqlErr::UniqueConstraintViolation(detail)) => Error::Conflict {
                code: "conflict",
                detail: format!(
                    "the change conflicts with another one made at the same time ({detail}); retry"
                ),
            },
            _ => Error::Database(err),
        }
    }
}

impl Error {
    pub fn invalid(code: &'static str, detail: impl Into<String>) -> Self {
        Error::Invalid {
            code,
            detail: detail.into(),
        }
    }

    pub fn unauthenticated(code: &'static str, detail: impl Into<String>) -> Self {
        Error::Unauthenticated {
            code,
            detail: detail.into(),
        }
    }

    pub fn forbidden(code: &'static str, detail: impl Into<String>) -> Self {
        Error::Forbidden {
            code,
            detail: detail.into(),
        }
    }

    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Error::Conflict {
            code,
            detail: detail.into(),
        }
    }

    pub fn not_found(entity: Entity, id: impl Into<String>) -> Self {
        Error::NotFound {
            entity,
            id: id.into(),
        }
    }

    /// Stable machine-readable code, shared by every transport.
    pub fn code(&self) -> &'static str {
        match self {
            Error::MissingToken => "missing_token",
            Error::InvalidToken => "invalid_token",
            Error::DeviceMismatch(_) => "device_mismatch",
            Error::DeviceUnassigned(_) => "device_unassigned",
            Error::HandshakeRefused(_) => "handshake_refused",
            Error::NotFound { entity, .. } => match entity {
                Entity::Device => "device_not_found",
                Entity::Command => "command_not_found",
                Entity::Machine => "machine_not_found",
                Entity::Outlet => "outlet_not_found",
                Entity::User => "user_not_found",
                Entity::ApiToken => "api_token_not_found",
            },
            Error::Malformed { code, .. }
            | Error::Invalid { code, .. }
            | Error::Conflict { code, .. }
            | Error::Unauthenticated { code, .. }
            | Error::Forbidden { code, .. } => code,
            Error::Unavailable => "unavailable",
            Error::RateLimited { .. } => "rate_limited",
            Error::Database(_) | Error::Internal(_) => "internal_error",
        }
    }
}
