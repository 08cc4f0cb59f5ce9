//! `/api/auth/*`: login (JWT in the body and in an HttpOnly cookie), logout, the current user,
//! registration and API tokens; and the security schemes every staff operation uses.

use std::{net::IpAddr, sync::Arc};

use chrono::{DateTime, Utc};
use poem::Request;
use poem_openapi::{
    auth::{ApiKey, Bearer},
    param::Path,
    payload::Json,
    ApiResponse, Object, OpenApi, SecurityScheme,
};

use super::common::{optional_text, page_request, text, ApiError, ApiResult, Deleted, Page};
use super::Tag;
use crate::{
    db::entities::{api_token, user},
    domain::{
        auth::{self, NewApiToken, Principal, Scope},
        queries,
        users::{self, NewUser, UserChange},
    },
    error::Error,
    http::limits::{client_ip, KeyedLimiter},
    state::AppState,
};

/// The cookie that carries the staff JWT.
pub const COOKIE_NAME: &str = "ozone_token";

fn state(req: &Request) -> poem::Result<&Arc<AppState>> {
    req.data::<Arc<AppState>>()
        .ok_or_else(|| Error::Internal("application state is missing".into()).into())
}

async fn resolve(req: &Request, credential: &str) -> poem::Result<Principal> {
    let state = state(req)?;
    Ok(auth::authenticate(&state.db, &state.auth, credential).await?)
}

fn presented_bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(poem::http::header::AUTHORIZATION)?;
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

// A request is refused when any credential it presents is invalid, even if another one is
// good: a stale or forged cookie next to a valid bearer token is a 401, not silently ignored.

async fn check_cookie(req: &Request, key: ApiKey) -> poem::Result<Principal> {
    let principal = resolve(req, &key.key).await?;
    if let Some(bearer) = presented_bearer(req) {
        return resolve(req, bearer).await;
    }
    Ok(principal)
}

async fn check_bearer(req: &Request, bearer: Bearer) -> poem::Result<Principal> {
    if let Some(cookie) = req.cookie().get(COOKIE_NAME) {
        resolve(req, cookie.value_str()).await?;
    }
    resolve(req, &bearer.token).await
}

/// The JWT from `POST /api/auth/login/`, sent back by the browser as a cookie.
#[derive(SecurityScheme)]
#[oai(
    rename = "cookieAuth",
    ty = "api_key",
    key_name = "ozone_token",
    key_in = "cookie",
    checker = "check_cookie"
)]
pub struct CookieAuth(Principal);

/// `Authorization: Bearer <token>`: the JWT from `POST /api/auth/login/`, or an API token.
#[derive(SecurityScheme)]
#[oai(
    rename = "bearerAuth",
    ty = "bearer",
    bearer_format = "JWT",
    checker = "check_bearer"
)]
pub struct BearerAuth(Principal);

/// Any active user, by cookie or bearer token. Role checks: [`StaffAuth::staff`] and
/// [`StaffAuth::superuser`].
#[derive(SecurityScheme)]
pub enum StaffAuth {
    Cookie(CookieAuth),
    Bearer(BearerAuth),
}

impl StaffAuth {
    pub fn principal(&self) -> &Principal {
        match self {
            StaffAuth::Cookie(CookieAuth(p)) | StaffAuth::Bearer(BearerAuth(p)) => p,
        }
    }

    /// The caller, if it is staff (mutations and commands).
    pub fn staff(&self) -> Result<&Principal, ApiError> {
        Ok(self.principal().require_staff()?)
    }

    /// The caller, if it is a superuser (flush, user administration).
    pub fn superuser(&self) -> Result<&Principal, ApiError> {
        Ok(self.principal().require_superuser()?)
    }
}

/// Like [`StaffAuth`], but anonymous callers get through (with no principal).
#[derive(SecurityScheme)]
pub enum OptionalAuth {
    Cookie(CookieAuth),
    Bearer(BearerAuth),
    #[oai(fallback)]
    Anonymous,
}

impl OptionalAuth {
    pub fn principal(&self) -> Option<&Principal> {
        match self {
            OptionalAuth::Cookie(CookieAuth(p)) | OptionalAuth::Bearer(BearerAuth(p)) => Some(p),
            OptionalAuth::Anonymous => None,
        }
    }
}

/// A user as staff see it.
#[derive(Debug, Clone, Object)]
pub struct UserDto {
    pub id: i32,
    pub username: String,
    pub email: String,
    pub first_name: String,
    pub last_name: String,
    pub is_staff: bool,
    pub is_superuser: bool,
    pub is_active: bool,
    #[oai(nullable)]
    pub last_login: Option<DateTime<Utc>>,
    pub date_joined: DateTime<Utc>,
}

impl From<&user::Model> for UserDto {
    fn from(u: &user::Model) -> Self {
        UserDto {
            id: u.id,
            username: u.username.clone(),
            email: u.email.clone(),
            first_name: u.first_name.clone(),
            last_name: u.last_name.clone(),
            is_staff: u.is_staff,
            is_superuser: u.is_superuser,
            is_active: u.is_active,
            last_login: u.last_login,
            date_joined: u.date_joined,
        }
    }
}

#[derive(Debug, Object)]
pub struct LoginBody {
    #[oai(deserialize_with = "text")]
    pub username: String,
    #[oai(write_only)]
    #[oai(deserialize_with = "text")]
    pub password: String,
}

#[derive(Debug, Object)]
pub struct LoginReply {
    pub success: bool,
    pub user: UserDto,
    /// The JWT; send it as `Authorization: Bearer <token>` (it is also set as a cookie).
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(ApiResponse)]
pub enum LoginResponse {
    /// Logged in; the JWT is also set as an HttpOnly, SameSite=Strict cookie.
    #[oai(status = 200)]
    Ok(Json<LoginReply>, #[oai(header = "Set-Cookie")] String),
}

#[derive(Debug, Object)]
pub struct MessageReply {
    pub success: bool,
    pub message: String,
}

#[derive(ApiResponse)]
pub enum LogoutResponse {
    /// Logged out: the token is revoked and the cookie cleared.
    #[oai(status = 200)]
    Ok(Json<MessageReply>, #[oai(header = "Set-Cookie")] String),
}

#[derive(Debug, Object)]
pub struct UserReply {
    pub success: bool,
    pub user: UserDto,
}

#[derive(Debug, Object)]
pub struct CheckReply {
    pub authenticated: bool,
    #[oai(nullable)]
    pub user: Option<UserDto>,
}

#[derive(Debug, Object)]
pub struct RegisterBody {
    #[oai(deserialize_with = "text")]
    pub username: String,
    #[oai(write_only)]
    #[oai(deserialize_with = "text")]
    pub password: String,
    #[oai(nullable, deserialize_with = "optional_text")]
    pub email: Option<String>,
    #[oai(nullable, deserialize_with = "optional_text")]
    pub first_name: Option<String>,
    #[oai(nullable, deserialize_with = "optional_text")]
    pub last_name: Option<String>,
    /// Only a superuser may create staff accounts.
    #[oai(default)]
    #[oai(nullable)]
    pub is_staff: bool,
}

#[derive(Debug, Object)]
pub struct RegisterReply {
    pub success: bool,
    pub message: String,
    pub user: UserDto,
}

#[derive(ApiResponse)]
pub enum RegisterResponse {
    /// The account was created.
    #[oai(status = 201)]
    Created(Json<RegisterReply>),
}

/// A superuser's change to an account; absent fields stay as they are.
#[derive(Debug, Object)]
pub struct UserPatchBody {
    #[oai(nullable)]
    #[oai(deserialize_with = "optional_text")]
    pub email: Option<String>,
    #[oai(nullable)]
    #[oai(deserialize_with = "optional_text")]
    pub first_name: Option<String>,
    #[oai(nullable)]
    #[oai(deserialize_with = "optional_text")]
    pub last_name: Option<String>,
    /// A deactivated user cannot log in; their sessions and API tokens stop working at once.
    #[oai(nullable)]
    pub is_active: Option<bool>,
    #[oai(nullable)]
    pub is_staff: Option<bool>,
    /// A superuser is also staff. The last active superuser cannot be demoted.
    #[oai(nullable)]
    pub is_superuser: Option<bool>,
    /// A new password (at least 8 characters); it ends the user's login sessions.
    #[oai(write_only)]
    #[oai(nullable)]
    #[oai(deserialize_with = "optional_text")]
    pub password: Option<String>,
}

#[derive(Debug, Object)]
pub struct PasswordBody {
    #[oai(write_only)]
    #[oai(deserialize_with = "text")]
    pub current_password: String,
    /// At least 8 characters.
    #[oai(write_only)]
    #[oai(deserialize_with = "text")]
    pub new_password: String,
}

/// An API token as listed (the token itself is shown only when created).
#[derive(Debug, Object)]
pub struct ApiTokenDto {
    pub id: i32,
    pub name: String,
    /// `read` or `staff`.
    pub scope: String,
    pub user_id: i32,
    pub created_at: DateTime<Utc>,
    #[oai(nullable)]
    pub expires_at: Option<DateTime<Utc>>,
    #[oai(nullable)]
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<api_token::Model> for ApiTokenDto {
    fn from(t: api_token::Model) -> Self {
        ApiTokenDto {
            id: t.id,
            name: t.name,
            scope: t.scope,
            user_id: t.user_id,
            created_at: t.created_at,
            expires_at: t.expires_at,
            revoked_at: t.revoked_at,
        }
    }
}

#[derive(Debug, Object)]
pub struct NewApiTokenBody {
    #[oai(deserialize_with = "text")]
    pub name: String,
    /// `read` (reads only, the default) or `staff` (the creating user's rights).
    #[oai(nullable, deserialize_with = "optional_text")]
    pub scope: Option<String>,
    /// When the token stops working; none = never.
    #[oai(nullable)]
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Object)]
pub struct CreatedApiToken {
    /// The token: shown this once, stored only as a hash.
    pub token: String,
    #[oai(flatten)]
    pub details: ApiTokenDto,
}

#[derive(ApiResponse)]
pub enum CreatedTokenResponse {
    /// The token was created; copy it now.
    #[oai(status = 201)]
    Created(Json<CreatedApiToken>),
}

fn session_cookie(value: &str, max_age: i64, secure: bool) -> String {
    format!(
        "{COOKIE_NAME}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

pub struct AuthApi;

#[OpenApi(tag = "Tag::Auth")]
impl AuthApi {
    /// Log in
    ///
    /// Checks a username and password and returns the user and a JWT, also set as an
    /// HttpOnly, SameSite=Strict cookie. Attempts are limited per client address and per
    /// user name (429 with `Retry-After`).
    #[oai(path = "/api/auth/login", method = "post", operation_id = "auth_login")]
    async fn login(
        &self,
        req: &Request,
        state: poem::web::Data<&Arc<AppState>>,
        body: Json<LoginBody>,
    ) -> ApiResult<LoginResponse> {
        let address = client_ip(
            req.remote_addr(),
            req.headers(),
            &state.limits.trusted_proxies,
        );
        state.login_limits.check(address, &body.username)?;
        let login = auth::login(&state.db, &state.auth, &body.username, &body.password).await?;
        let cookie = session_cookie(
            &login.token,
            state.auth.ttl().num_seconds(),
            state.settings.secure_cookies,
        );
        Ok(LoginResponse::Ok(
            Json(LoginReply {
                success: true,
                user: UserDto::from(&login.user),
                token: login.token,
                expires_at: login.expires_at,
            }),
            cookie,
        ))
    }

    /// Log out
    ///
    /// Revokes the presented login token (it stops working at once) and clears the cookie.
    #[oai(
        path = "/api/auth/logout",
        method = "post",
        operation_id = "auth_logout"
    )]
    async fn logout(
        &self,
        auth: StaffAuth,
        state: poem::web::Data<&Arc<AppState>>,
    ) -> ApiResult<LogoutResponse> {
        auth::logout(&state.db, auth.principal()).await?;
        Ok(LogoutResponse::Ok(
            Json(MessageReply {
                success: true,
                message: "Successfully logged out".into(),
            }),
            session_cookie("", 0, state.settings.secure_cookies),
        ))
    }

    /// The current user
    #[oai(path = "/api/auth/user", method = "get", operation_id = "auth_user")]
    async fn user(&self, auth: StaffAuth) -> ApiResult<Json<UserReply>> {
        Ok(Json(UserReply {
            success: true,
            user: UserDto::from(&auth.principal().user),
        }))
    }

    /// Whether the caller is logged in
    ///
    /// Answers 200 either way: `{authenticated: false}` for anonymous callers (or an
    /// invalid credential).
    #[oai(path = "/api/auth/check", method = "get", operation_id = "auth_check")]
    async fn check(&self, auth: OptionalAuth) -> ApiResult<Json<CheckReply>> {
        let user = auth.principal().map(|p| UserDto::from(&p.user));
        Ok(Json(CheckReply {
            authenticated: user.is_some(),
            user,
        }))
    }

    /// Register a user
    ///
    /// Staff only, unless the server's `open_registration` setting is on. Only a superuser
    /// may create a staff account.
    #[oai(
        path = "/api/auth/register",
        method = "post",
        operation_id = "auth_register"
    )]
    async fn register(
        &self,
        auth: OptionalAuth,
        state: poem::web::Data<&Arc<AppState>>,
        body: Json<RegisterBody>,
    ) -> ApiResult<RegisterResponse> {
        let body = body.0;
        match auth.principal() {
            Some(p) => {
                p.require_staff()?;
                if body.is_staff {
                    p.require_superuser()?;
                }
            }
            None if state.settings.open_registration && !body.is_staff => {}
            None => {
                return Err(Error::unauthenticated(
                    "not_authenticated",
                    "registration needs a staff login",
                )
                .into())
            }
        }
        let created = users::create(
            &state.db,
            NewUser {
                username: body.username,
                password: body.password,
                email: body.email.unwrap_or_default(),
                first_name: body.first_name.unwrap_or_default(),
                last_name: body.last_name.unwrap_or_default(),
                is_staff: body.is_staff,
                is_superuser: false,
            },
        )
        .await?;
        Ok(RegisterResponse::Created(Json(RegisterReply {
            success: true,
            message: "User created successfully".into(),
            user: UserDto::from(&created),
        })))
    }

    /// List users
    ///
    /// Every account, oldest first. Superusers only.
    #[oai(
        path = "/api/auth/users",
        method = "get",
        operation_id = "auth_users_list"
    )]
    async fn list_users(
        &self,
        req: &Request,
        auth: StaffAuth,
        state: poem::web::Data<&Arc<AppState>>,
        /// Items per page (1-1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: poem_openapi::param::Query<Option<i64>>,
        /// Items to skip.
        #[oai(validator(minimum(value = "0")))]
        offset: poem_openapi::param::Query<Option<i64>>,
    ) -> ApiResult<Json<Page<UserDto>>> {
        auth.superuser()?;
        let window = page_request(limit.0, offset.0)?;
        let page = users::list(&state.db, window).await?;
        Ok(Json(Page::from_domain(req, page, |u| UserDto::from(&u))))
    }

    /// Show a user
    ///
    /// Superusers only.
    #[oai(
        path = "/api/auth/users/:id",
        method = "get",
        operation_id = "auth_users_get"
    )]
    async fn get_user(
        &self,
        auth: StaffAuth,
        state: poem::web::Data<&Arc<AppState>>,
        id: Path<i32>,
    ) -> ApiResult<Json<UserDto>> {
        auth.superuser()?;
        Ok(Json(UserDto::from(&users::get(&state.db, id.0).await?)))
    }

    /// Change a user
    ///
    /// Superusers only: names, email, roles, activation and password. Deactivating a user or
    /// setting a new password ends their login sessions at once; the last active superuser
    /// cannot be deactivated or demoted (409 `last_superuser`).
    #[oai(
        path = "/api/auth/users/:id",
        method = "patch",
        operation_id = "auth_users_update"
    )]
    async fn update_user(
        &self,
        auth: StaffAuth,
        state: poem::web::Data<&Arc<AppState>>,
        id: Path<i32>,
        body: Json<UserPatchBody>,
    ) -> ApiResult<Json<UserDto>> {
        let actor = auth.superuser()?;
        let body = body.0;
        let updated = users::update(
            &state.db,
            id.0,
            UserChange {
                email: body.email,
                first_name: body.first_name,
                last_name: body.last_name,
                is_active: body.is_active,
                is_staff: body.is_staff,
                is_superuser: body.is_superuser,
                password: body.password,
            },
        )
        .await?;
        tracing::info!(
            actor = actor.username(),
            user = updated.username.as_str(),
            is_active = updated.is_active,
            is_staff = updated.is_staff,
            is_superuser = updated.is_superuser,
            "user changed"
        );
        Ok(Json(UserDto::from(&updated)))
    }

    /// Change my password
    ///
    /// Needs the current password. The caller's other login sessions end; the one that made
    /// the change stays valid.
    #[oai(
        path = "/api/auth/password",
        method = "post",
        operation_id = "auth_password_change"
    )]
    async fn change_password(
        &self,
        auth: StaffAuth,
        state: poem::web::Data<&Arc<AppState>>,
        body: Json<PasswordBody>,
    ) -> ApiResult<Json<MessageReply>> {
        let principal = auth.principal();
        if principal.session.is_none() {
            return Err(Error::forbidden(
                "session_required",
                "an API token cannot change its user's password; log in with the password",
            )
            .into());
        }
        users::change_own_password(
            &state.db,
            &principal.user,
            &body.current_password,
            body.0.new_password.clone(),
            principal.session.as_deref(),
        )
        .await?;
        Ok(Json(MessageReply {
            success: true,
            message: "Password changed".into(),
        }))
    }

    /// Create an API token
    ///
    /// A long-lived credential for integrations, sent as `Authorization: Bearer <token>`.
    /// The token is shown once; only its hash is stored. Staff only.
    #[oai(
        path = "/api/auth/tokens",
        method = "post",
        operation_id = "auth_tokens_create"
    )]
    async fn create_token(
        &self,
        auth: StaffAuth,
        state: poem::web::Data<&Arc<AppState>>,
        body: Json<NewApiTokenBody>,
    ) -> ApiResult<CreatedTokenResponse> {
        let body = body.0;
        let (created, token) = auth::create_api_token(
            &state.db,
            auth.staff()?,
            NewApiToken {
                name: body.name,
                scope: Scope::parse_token_scope(body.scope.as_deref().unwrap_or("read"))?,
                expires_at: body.expires_at,
            },
        )
        .await?;
        Ok(CreatedTokenResponse::Created(Json(CreatedApiToken {
            token,
            details: created.into(),
        })))
    }

    /// List API tokens
    ///
    /// The caller's own tokens (every token for a superuser). Staff only.
    #[oai(
        path = "/api/auth/tokens",
        method = "get",
        operation_id = "auth_tokens_list"
    )]
    async fn list_tokens(
        &self,
        req: &Request,
        auth: StaffAuth,
        state: poem::web::Data<&Arc<AppState>>,
        /// Items per page (1-1000, default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: poem_openapi::param::Query<Option<i64>>,
        /// Items to skip.
        #[oai(validator(minimum(value = "0")))]
        offset: poem_openapi::param::Query<Option<i64>>,
    ) -> ApiResult<Json<Page<ApiTokenDto>>> {
        let window = page_request(limit.0, offset.0)?;
        let tokens = auth::list_api_tokens(&state.db, auth.principal()).await?;
        Ok(Json(Page::from_domain(
            req,
            queries::Page::from_vec(tokens, window),
            ApiTokenDto::from,
        )))
    }

    /// Revoke an API token
    #[oai(
        path = "/api/auth/tokens/:id",
        method = "delete",
        operation_id = "auth_tokens_revoke"
    )]
    async fn revoke_token(
        &self,
        auth: StaffAuth,
        state: poem::web::Data<&Arc<AppState>>,
        id: Path<i32>,
    ) -> ApiResult<Deleted> {
        auth::revoke_api_token(&state.db, auth.principal(), id.0).await?;
        Ok(Deleted::Done)
    }
}

/// Limits login attempts per client address and per user name (429 with `Retry-After`).
pub struct LoginLimits {
    per_addr: KeyedLimiter<IpAddr>,
    per_user: KeyedLimiter<String>,
}

impl LoginLimits {
    pub fn new(per_minute: u32) -> LoginLimits {
        let minute = std::time::Duration::from_secs(60);
        LoginLimits {
            per_addr: KeyedLimiter::new(
                "logins_per_addr",
                "login attempts from this address",
                per_minute,
                minute,
            ),
            per_user: KeyedLimiter::new(
                "logins_per_user",
                "login attempts for this user",
                per_minute,
                minute,
            ),
        }
    }

    /// Counts one attempt; refuses it when the address or the user name is over its limit.
    pub fn check(&self, addr: IpAddr, username: &str) -> crate::error::Result<()> {
        self.per_addr.check(&addr)?;
        self.per_user.check(&username.trim().to_lowercase())
    }

    pub fn housekeep(&self) {
        self.per_addr.housekeep();
        self.per_user.housekeep();
    }
}
