//! Staff accounts: creation and password hashing (argon2id).

use argon2::{
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use chrono::Utc;
use sea_orm::{
    sea_query::Expr, ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder,
};

use crate::{
    db::{
        entities::{user, user_session},
        Db,
    },
    domain::queries::{self, Page, PageRequest},
    error::{Entity, Error, Result},
};

pub const PASSWORD_MIN: usize = 8;

pub fn hash_password(password: &str) -> Result<String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| Error::Internal(format!("salt encoding failed: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Internal(format!("password hashing failed: {e}")))
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

#[derive(Debug, Clone, Default)]
pub struct NewUser {
    pub username: String,
    pub password: String,
    pub email: String,
    pub first_name: String,
    pub last_name: String,
    pub is_staff: bool,
    pub is_superuser: bool,
}

pub fn validate_username(username: &str) -> Result<String> {
    let u = username.trim();
    if u.is_empty()
        || u.len() > 150
        || !u
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '@' | '.' | '+' | '-' | '_'))
    {
        return Err(Error::invalid(
            "invalid_username",
            "username must be 1-150 letters, digits or @.+-_",
        ));
    }
    Ok(u.to_owned())
}

fn check_password(password: &str) -> Result<()> {
    if password.chars().count() < PASSWORD_MIN {
        return Err(Error::invalid(
            "weak_password",
            format!("password must be at least {PASSWORD_MIN} characters"),
        ));
    }
    Ok(())
}

/// Hashes a password off the async workers (argon2 takes tens of milliseconds of CPU).
async fn hash_off_thread(password: String) -> Result<String> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| Error::Internal(format!("password hashing failed: {e}")))?
}

/// Checks a password against its hash off the async workers.
pub async fn verify_off_thread(password: &str, hash: String) -> Result<bool> {
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .map_err(|e| Error::Internal(format!("password check failed: {e}")))
}

pub async fn create(db: &Db, new: NewUser) -> Result<user::Model> {
    let username = validate_username(&new.username)?;
    check_password(&new.password)?;
    let password_hash = hash_off_thread(new.password).await?;
    let txn = db.begin_write().await?;
    if user::Entity::find()
        .filter(user::Column::Username.eq(username.as_str()))
        .one(&*txn)
        .await?
        .is_some()
    {
        return Err(Error::Conflict {
            code: "username_taken",
            detail: format!("user `{username}` already exists"),
        });
    }
    let created = user::ActiveModel {
        username: Set(username),
        password_hash: Set(password_hash),
        email: Set(new.email.trim().to_owned()),
        first_name: Set(new.first_name),
        last_name: Set(new.last_name),
        is_staff: Set(new.is_staff),
        is_superuser: Set(new.is_superuser),
        is_active: Set(true),
        last_login: Set(None),
        date_joined: Set(Utc::now()),
        ..Default::default()
    }
    .insert(&*txn)
    .await?;
    txn.commit().await?;
    Ok(created)
}

/// Every account, oldest first.
pub async fn list(db: &Db, page: PageRequest) -> Result<Page<user::Model>> {
    let query = user::Entity::find().order_by_asc(user::Column::Id);
    queries::paginate(db.conn(), query, page).await
}

pub async fn get(db: &Db, id: i32) -> Result<user::Model> {
    user::Entity::find_by_id(id)
        .one(db.conn())
        .await?
        .ok_or_else(|| Error::not_found(Entity::User, id.to_string()))
}

/// A change to an account by a superuser; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct UserChange {
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub is_active: Option<bool>,
    pub is_staff: Option<bool>,
    pub is_superuser: Option<bool>,
    pub password: Option<String>,
}

/// Changes an account. A new password or a deactivation ends the user's login sessions at
/// once (deactivation also stops its API tokens, which are checked against the user on every
/// request). The last active superuser cannot be deactivated or demoted, so the server never
/// loses its administrators.
pub async fn update(db: &Db, id: i32, change: UserChange) -> Result<user::Model> {
    let password_hash = match change.password {
        Some(password) => {
            check_password(&password)?;
            Some(hash_off_thread(password).await?)
        }
        None => None,
    };
    let txn = db.begin_write().await?;
    let current = user::Entity::find_by_id(id)
        .one(&*txn)
        .await?
        .ok_or_else(|| Error::not_found(Entity::User, id.to_string()))?;
    let active = change.is_active.unwrap_or(current.is_active);
    // A superuser is staff by definition.
    let superuser = change.is_superuser.unwrap_or(current.is_superuser);
    let staff = change.is_staff.unwrap_or(current.is_staff) || superuser;
    if current.is_superuser && current.is_active && !(superuser && active) {
        let others = user::Entity::find()
            .filter(user::Column::IsSuperuser.eq(true))
            .filter(user::Column::IsActive.eq(true))
            .filter(user::Column::Id.ne(id))
            .count(&*txn)
            .await?;
        if others == 0 {
            return Err(Error::conflict(
                "last_superuser",
                format!(
                    "`{}` is the last active superuser; make another one first",
                    current.username
                ),
            ));
        }
    }
    let ends_sessions = password_hash.is_some() || (current.is_active && !active);
    let mut row: user::ActiveModel = current.into();
    if let Some(email) = change.email {
        row.email = Set(email.trim().to_owned());
    }
    if let Some(first_name) = change.first_name {
        row.first_name = Set(first_name);
    }
    if let Some(last_name) = change.last_name {
        row.last_name = Set(last_name);
    }
    if let Some(hash) = password_hash {
        row.password_hash = Set(hash);
    }
    row.is_active = Set(active);
    row.is_staff = Set(staff);
    row.is_superuser = Set(superuser);
    let updated = row.update(&*txn).await?;
    if ends_sessions {
        revoke_sessions(&*txn, id, None).await?;
    }
    txn.commit().await?;
    Ok(updated)
}

/// A user changes their own password, proving the current one. Their other login sessions
/// end; the one that made the change (`keep_session`) stays valid.
pub async fn change_own_password(
    db: &Db,
    user: &user::Model,
    current_password: &str,
    new_password: String,
    keep_session: Option<&str>,
) -> Result<()> {
    check_password(&new_password)?;
    if !verify_off_thread(current_password, user.password_hash.clone()).await? {
        return Err(Error::invalid(
            "wrong_password",
            "the current password is not correct",
        ));
    }
    let new_hash = hash_off_thread(new_password).await?;
    let txn = db.begin_write().await?;
    user::Entity::update_many()
        .col_expr(user::Column::PasswordHash, Expr::value(new_hash))
        .filter(user::Column::Id.eq(user.id))
        .exec(&*txn)
        .await?;
    revoke_sessions(&*txn, user.id, keep_session).await?;
    txn.commit().await?;
    Ok(())
}

async fn revoke_sessions(
    conn: &impl ConnectionTrait,
    user_id: i32,
    keep: Option<&str>,
) -> Result<()> {
    let mut query = user_session::Entity::update_many()
        .col_expr(user_session::Column::RevokedAt, Expr::value(Utc::now()))
        .filter(user_session::Column::UserId.eq(user_id))
        .filter(user_session::Column::RevokedAt.is_null());
    if let Some(jti) = keep {
        query = query.filter(user_session::Column::Jti.ne(jti));
    }
    query.exec(conn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_against_their_hash() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong horse", &hash));
        assert!(!verify_password("correct horse", "not a hash"));
    }
}
