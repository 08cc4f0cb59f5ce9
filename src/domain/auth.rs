//! Staff authentication: password login issuing HS256 JWTs backed by a session row (so logout
//! and deactivation take effect at once), and long-lived API tokens for integrations.
//!
//! Every staff request resolves its credential to a [`Principal`] here; the transports only
//! find the credential (cookie or `Authorization: Bearer`) and check the role it needs.

use std::sync::OnceLock;

use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use sea_orm::{
    sea_query::Expr, ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter,
    QueryOrder,
};
use serde::{Deserialize, Serialize};

use crate::{
    db::{
        entities::{api_token, app_secret, user, user_session},
        Db,
    },
    domain::{devices::hash_token, users},
    error::{Entity, Error, Result},
};

/// API tokens start with this, so a bearer credential is told apart from a JWT at a glance.
pub const API_TOKEN_PREFIX: &str = "ozt_";
const SECRET_NAME: &str = "jwt_hs256";

/// The signing keys of staff JWTs.
#[derive(Clone)]
pub struct AuthKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
}

impl std::fmt::Debug for AuthKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthKeys").finish_non_exhaustive()
    }
}

impl AuthKeys {
    pub fn from_secret(secret: &[u8], ttl: Duration) -> AuthKeys {
        AuthKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            ttl,
        }
    }

    /// The configured secret, or the one stored in the database (generated on first use).
    pub async fn load(db: &Db, configured: Option<&str>, ttl: Duration) -> Result<AuthKeys> {
        if let Some(secret) = configured {
            return Ok(AuthKeys::from_secret(secret.as_bytes(), ttl));
        }
        if let Some(stored) = app_secret::Entity::find_by_id(SECRET_NAME)
            .one(db.conn())
            .await?
        {
            return Ok(AuthKeys::from_secret(stored.value.as_bytes(), ttl));
        }
        let generated = hex::encode(rand::random::<[u8; 32]>());
        let txn = db.begin_write().await?;
        // Two processes starting together on one database: the first insert wins, both read it.
        let _ = app_secret::Entity::insert(app_secret::ActiveModel {
            name: Set(SECRET_NAME.to_owned()),
            value: Set(generated),
            created_at: Set(Utc::now()),
        })
        .on_conflict_do_nothing_on([app_secret::Column::Name])
        .exec(&*txn)
        .await?;
        let stored = app_secret::Entity::find_by_id(SECRET_NAME)
            .one(&*txn)
            .await?
            .ok_or_else(|| Error::Internal("the JWT secret could not be stored".into()))?;
        txn.commit().await?;
        Ok(AuthKeys::from_secret(stored.value.as_bytes(), ttl))
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    jti: String,
    iat: i64,
    exp: i64,
}

/// What a credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A login session: the user's own roles.
    Session,
    /// An API token limited to reads.
    Read,
    /// An API token with the user's staff rights.
    Staff,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Session => "session",
            Scope::Read => "read",
            Scope::Staff => "staff",
        }
    }

    pub fn parse_token_scope(s: &str) -> Result<Scope> {
        match s {
            "read" => Ok(Scope::Read),
            "staff" => Ok(Scope::Staff),
            other => Err(Error::invalid(
                "invalid_scope",
                format!("scope `{other}` is not one of read, staff"),
            )),
        }
    }
}

/// The authenticated caller of a staff request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: user::Model,
    pub scope: Scope,
    /// The session id of a JWT login (what logout revokes).
    pub session: Option<String>,
}

impl Principal {
    pub fn username(&self) -> &str {
        &self.user.username
    }

    /// Mutations and commands.
    pub fn require_staff(&self) -> Result<&Principal> {
        if !self.user.is_staff && !self.user.is_superuser {
            return Err(Error::forbidden(
                "staff_required",
                "this action needs a staff account",
            ));
        }
        if self.scope == Scope::Read {
            return Err(Error::forbidden(
                "read_only_token",
                "this API token is limited to reads",
            ));
        }
        Ok(self)
    }

    /// Flush and user administration.
    pub fn require_superuser(&self) -> Result<&Principal> {
        self.require_staff()?;
        if !self.user.is_superuser {
            return Err(Error::forbidden(
                "superuser_required",
                "this action needs a superuser account",
            ));
        }
        Ok(self)
    }
}

/// A successful login.
#[derive(Debug, Clone)]
pub struct Login {
    pub user: user::Model,
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

/// Verifies against a hash of a random password when the user does not exist, so a failed
/// login costs the same time either way.
fn dummy_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        users::hash_password(&hex::encode(rand::random::<[u8; 16]>())).unwrap_or_default()
    })
}

fn bad_credentials() -> Error {
    Error::unauthenticated("invalid_credentials", "username or password is incorrect")
}

fn inactive(username: &str) -> Error {
    Error::unauthenticated("user_inactive", format!("user `{username}` is deactivated"))
}

/// Checks a username and password: the active user they belong to. A deactivated account is
/// told apart only once its password is right.
pub async fn check_password(db: &Db, username: &str, password: &str) -> Result<user::Model> {
    let found = user::Entity::find()
        .filter(user::Column::Username.eq(username.trim()))
        .one(db.conn())
        .await?;
    let hash = found
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| dummy_hash().to_owned());
    let verified = users::verify_off_thread(password, hash).await?;
    let Some(user) = found.filter(|_| verified) else {
        return Err(bad_credentials());
    };
    if !user.is_active {
        return Err(inactive(&user.username));
    }
    Ok(user)
}

/// Checks a username and password and opens a session.
pub async fn login(db: &Db, keys: &AuthKeys, username: &str, password: &str) -> Result<Login> {
    let user = check_password(db, username, password).await?;
    let now = Utc::now();
    let expires_at = now + keys.ttl;
    let jti = uuid::Uuid::now_v7().simple().to_string();
    let claims = Claims {
        sub: user.id.to_string(),
        jti: jti.clone(),
        iat: now.timestamp(),
        exp: expires_at.timestamp(),
    };
    let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &keys.encoding)
        .map_err(|e| Error::Internal(format!("JWT signing failed: {e}")))?;
    let txn = db.begin_write().await?;
    user_session::ActiveModel {
        jti: Set(jti),
        user_id: Set(user.id),
        created_at: Set(now),
        expires_at: Set(expires_at),
        revoked_at: Set(None),
        ..Default::default()
    }
    .insert(&*txn)
    .await?;
    user::Entity::update_many()
        .col_expr(user::Column::LastLogin, Expr::value(now))
        .filter(user::Column::Id.eq(user.id))
        .exec(&*txn)
        .await?;
    txn.commit().await?;
    Ok(Login {
        user,
        token,
        expires_at,
    })
}

/// Resolves a bearer credential (a JWT or an API token) to its principal. Revocation,
/// expiry and deactivation are checked on every call.
pub async fn authenticate(db: &Db, keys: &AuthKeys, credential: &str) -> Result<Principal> {
    let credential = credential.trim();
    if credential.is_empty() {
        return Err(Error::MissingToken);
    }
    if credential.starts_with(API_TOKEN_PREFIX) {
        return authenticate_api_token(db, credential).await;
    }
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let claims = jsonwebtoken::decode::<Claims>(credential, &keys.decoding, &validation)
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => {
                Error::unauthenticated("token_expired", "the token has expired; log in again")
            }
            _ => Error::InvalidToken,
        })?
        .claims;
    let session = user_session::Entity::find()
        .filter(user_session::Column::Jti.eq(claims.jti.as_str()))
        .one(db.conn())
        .await?
        .ok_or(Error::InvalidToken)?;
    if session.revoked_at.is_some() {
        return Err(Error::unauthenticated(
            "token_revoked",
            "the token was revoked (logged out); log in again",
        ));
    }
    if claims.sub != session.user_id.to_string() {
        return Err(Error::InvalidToken);
    }
    let user = active_user(db, session.user_id).await?;
    Ok(Principal {
        user,
        scope: Scope::Session,
        session: Some(session.jti),
    })
}

/// Whether a secret is a bearer credential (an API token or a JWT) rather than a password.
pub fn is_bearer_credential(secret: &str) -> bool {
    let secret = secret.trim();
    // Every JWT header is a JSON object, `{"` in base64url.
    secret.starts_with(API_TOKEN_PREFIX)
        || (secret.starts_with("eyJ") && secret.split('.').count() == 3)
}

/// A staff login for a transport that keeps no session of its own (MQTT): `username` with its
/// password, or with one of its JWTs or API tokens as the password. Revocation, expiry and
/// deactivation are checked as for every staff request.
pub async fn authenticate_login(
    db: &Db,
    keys: &AuthKeys,
    username: &str,
    secret: &str,
) -> Result<Principal> {
    if is_bearer_credential(secret) {
        match authenticate(db, keys, secret).await {
            Ok(principal) if principal.user.username == username.trim() => return Ok(principal),
            // Someone else's credential: as wrong as a wrong password.
            Ok(_) => return Err(bad_credentials()),
            // A password that merely looks like a token.
            Err(Error::InvalidToken) => {}
            Err(err) => return Err(err),
        }
    }
    let user = check_password(db, username, secret).await?;
    Ok(Principal {
        user,
        scope: Scope::Session,
        session: None,
    })
}

async fn active_user(db: &Db, id: i32) -> Result<user::Model> {
    let user = user::Entity::find_by_id(id)
        .one(db.conn())
        .await?
        .ok_or(Error::InvalidToken)?;
    if !user.is_active {
        return Err(inactive(&user.username));
    }
    Ok(user)
}

async fn authenticate_api_token(db: &Db, credential: &str) -> Result<Principal> {
    let token = api_token::Entity::find()
        .filter(api_token::Column::TokenHash.eq(hash_token(credential)))
        .one(db.conn())
        .await?
        .ok_or(Error::InvalidToken)?;
    if token.revoked_at.is_some() {
        return Err(Error::unauthenticated(
            "token_revoked",
            "the API token was revoked",
        ));
    }
    if token.expires_at.is_some_and(|e| e <= Utc::now()) {
        return Err(Error::unauthenticated(
            "token_expired",
            "the API token has expired",
        ));
    }
    let user = active_user(db, token.user_id).await?;
    let scope = Scope::parse_token_scope(&token.scope).unwrap_or(Scope::Read);
    Ok(Principal {
        user,
        scope,
        session: None,
    })
}

/// Revokes a login session; the JWT stops working at once.
pub async fn logout(db: &Db, principal: &Principal) -> Result<()> {
    let Some(jti) = &principal.session else {
        return Ok(());
    };
    let txn = db.begin_write().await?;
    user_session::Entity::update_many()
        .col_expr(user_session::Column::RevokedAt, Expr::value(Utc::now()))
        .filter(user_session::Column::Jti.eq(jti.as_str()))
        .filter(user_session::Column::RevokedAt.is_null())
        .exec(&*txn)
        .await?;
    txn.commit().await?;
    Ok(())
}

/// A new API token.
#[derive(Debug, Clone)]
pub struct NewApiToken {
    pub name: String,
    pub scope: Scope,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Creates an API token for `owner`; the plain token is returned once and never stored.
pub async fn create_api_token(
    db: &Db,
    owner: &Principal,
    new: NewApiToken,
) -> Result<(api_token::Model, String)> {
    owner.require_staff()?;
    let name = new.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(Error::invalid(
            "invalid_field",
            "name must be 1-100 characters",
        ));
    }
    if new.scope == Scope::Session {
        return Err(Error::invalid(
            "invalid_scope",
            "scope must be read or staff",
        ));
    }
    let now = Utc::now();
    if new.expires_at.is_some_and(|e| e <= now) {
        return Err(Error::invalid(
            "invalid_expires_at",
            "expires_at must be in the future",
        ));
    }
    let plain = format!(
        "{API_TOKEN_PREFIX}{}",
        hex::encode(rand::random::<[u8; 32]>())
    );
    let txn = db.begin_write().await?;
    let created = api_token::ActiveModel {
        name: Set(name.to_owned()),
        token_hash: Set(hash_token(&plain)),
        user_id: Set(owner.user.id),
        scope: Set(new.scope.as_str().to_owned()),
        created_at: Set(now),
        expires_at: Set(new.expires_at),
        revoked_at: Set(None),
        last_used_at: Set(None),
        ..Default::default()
    }
    .insert(&*txn)
    .await?;
    txn.commit().await?;
    Ok((created, plain))
}

/// The API tokens a user may see: their own, or every one for a superuser.
pub async fn list_api_tokens(db: &Db, viewer: &Principal) -> Result<Vec<api_token::Model>> {
    viewer.require_staff()?;
    let mut query = api_token::Entity::find().order_by_asc(api_token::Column::Id);
    if !viewer.user.is_superuser {
        query = query.filter(api_token::Column::UserId.eq(viewer.user.id));
    }
    Ok(query.all(db.conn()).await?)
}

/// Revokes an API token (its owner's, or any for a superuser).
pub async fn revoke_api_token(db: &Db, viewer: &Principal, id: i32) -> Result<api_token::Model> {
    viewer.require_staff()?;
    let txn = db.begin_write().await?;
    let token = api_token::Entity::find_by_id(id)
        .one(&*txn)
        .await?
        .filter(|t| viewer.user.is_superuser || t.user_id == viewer.user.id)
        .ok_or_else(|| Error::not_found(Entity::ApiToken, id.to_string()))?;
    if token.revoked_at.is_some() {
        return Ok(token);
    }
    let mut active: api_token::ActiveModel = token.into();
    active.revoked_at = Set(Some(Utc::now()));
    let updated = active.update(&*txn).await?;
    txn.commit().await?;
    Ok(updated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_credentials_are_told_apart_from_passwords() {
        assert!(is_bearer_credential("ozt_0123abcd"));
        assert!(is_bearer_credential(
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
        ));
        assert!(!is_bearer_credential("correct horse battery"));
        assert!(!is_bearer_credential("eyJ.only-two"));
        assert!(!is_bearer_credential("a.b.c"));
    }
}
