//! Staff accounts: creation and password hashing (argon2id).

use argon2::{
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use chrono::Utc;
use sea_orm::{ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter};

use crate::{
    db::{entities::user, Db},
    error::{Error, Result},
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

pub async fn create(db: &Db, new: NewUser) -> Result<user::Model> {
    let username = validate_username(&new.username)?;
    if new.password.chars().count() < PASSWORD_MIN {
        return Err(Error::invalid(
            "weak_password",
            format!("password must be at least {PASSWORD_MIN} characters"),
        ));
    }
    let password_hash = hash_password(&new.password)?;
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
