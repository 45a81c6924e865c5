//! Who is asking: requests carry `Authorization: Bearer <token>`; the configured users hold
//! only each token's SHA-256 (tokens are 32 random bytes from `millwright user add`, so a plain
//! hash is enough), and each route needs a minimum role. Failed tokens count against the
//! client's address ([`millwright_shared::lockout`]); a locked-out address is answered 429.

use crate::config::{Role, User};
use axum::http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

/// The token a request carries, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// SHA-256 of a token, in hex: what the config stores.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new token: 32 random bytes in hex.
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    Ok(format!("mw_{}", hex::encode(bytes)))
}

/// The user a token belongs to.
pub fn user_of<'a>(users: &'a [User], token: &str) -> Option<&'a User> {
    let hash = token_hash(token);
    users.iter().find(|u| constant_time_eq(u.token_sha256.as_bytes(), hash.as_bytes()))
}

/// The user a request's token belongs to, if it has at least `needed`.
pub fn authorize(
    headers: &HeaderMap,
    users: &[User],
    needed: Role,
) -> Result<String, (StatusCode, String)> {
    signed_in(headers, users, needed).map(|u| u.name.clone())
}

/// Reads need a viewer's token once any user is configured; a server without users is open
/// to read (and nobody can write to it).
pub fn authorize_read(headers: &HeaderMap, users: &[User]) -> Result<(), (StatusCode, String)> {
    if users.is_empty() { Ok(()) } else { signed_in(headers, users, Role::Viewer).map(|_| ()) }
}

/// The configured user a request's token belongs to, if it has at least `needed`.
pub fn signed_in<'a>(
    headers: &HeaderMap,
    users: &'a [User],
    needed: Role,
) -> Result<&'a User, (StatusCode, String)> {
    let token = bearer(headers).ok_or((
        StatusCode::UNAUTHORIZED,
        "sign in: send Authorization: Bearer <token>".to_owned(),
    ))?;
    let user =
        user_of(users, token).ok_or((StatusCode::UNAUTHORIZED, "unknown token".to_owned()))?;
    if user.role < needed {
        return Err((
            StatusCode::FORBIDDEN,
            format!("{} is a {:?}; this needs {:?} or above", user.name, user.role, needed),
        ));
    }
    Ok(user)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_map_to_users_by_their_hash_and_roles_are_ordered() {
        let user = |name: &str, role, token: &str| User {
            name: name.into(),
            role,
            token_sha256: token_hash(token),
        };
        let users = vec![
            user("ada", Role::Operator, "t-operator-0123456789"),
            user("bob", Role::Viewer, "t-viewer-0123456789"),
        ];
        assert!(!users[0].token_sha256.contains("operator"), "only the hash is kept");
        let mut h = HeaderMap::new();
        assert_eq!(authorize(&h, &users, Role::Operator).unwrap_err().0, StatusCode::UNAUTHORIZED);
        h.insert("authorization", "Bearer t-operator-0123456789".parse().unwrap());
        assert_eq!(authorize(&h, &users, Role::Operator).unwrap(), "ada");
        assert_eq!(authorize(&h, &users, Role::Admin).unwrap_err().0, StatusCode::FORBIDDEN);
        assert_eq!(authorize_read(&h, &users), Ok(()));
        h.insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(authorize(&h, &users, Role::Viewer).unwrap_err().0, StatusCode::UNAUTHORIZED);
        assert_eq!(authorize_read(&h, &users).unwrap_err().0, StatusCode::UNAUTHORIZED);
        assert_eq!(authorize_read(&HeaderMap::new(), &[]), Ok(()), "no users: open to read");
        let token = new_token().unwrap();
        assert_eq!(token.len(), 67);
        assert_ne!(token, new_token().unwrap());
    }
}
