//! Who is asking: write requests carry `Authorization: Bearer <token>`, matched against the
//! configured users; each route needs a minimum role.

use crate::config::{Role, User};
use axum::http::{HeaderMap, StatusCode};

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
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or((
            StatusCode::UNAUTHORIZED,
            "sign in: send Authorization: Bearer <token>".to_owned(),
        ))?;
    let user = users
        .iter()
        .find(|u| constant_time_eq(u.token.as_bytes(), token.trim().as_bytes()))
        .ok_or((StatusCode::UNAUTHORIZED, "unknown token".to_owned()))?;
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
    fn tokens_map_to_users_and_roles_are_ordered() {
        let users = vec![
            User {
                name: "ada".into(),
                role: Role::Operator,
                token: "t-operator-0123456789".into(),
            },
            User { name: "bob".into(), role: Role::Viewer, token: "t-viewer-0123456789".into() },
        ];
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
    }
}
