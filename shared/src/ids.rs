//! Newtypes for the identifiers that travel in topics and messages.
//!
//! Every id is 1–64 characters of `[A-Za-z0-9_.-]`, other than `.` and `..`, so it can stand in
//! an MQTT topic level and a file name without escaping, and never names a parent folder.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} {value:?} is longer than 64 characters")]
    TooLong { kind: &'static str, value: String },
    #[error("{kind} {value:?} may only contain letters, digits, '_', '.' and '-'")]
    BadCharacter { kind: &'static str, value: String },
    #[error("{kind} {value:?} names a folder, not a thing")]
    Dots { kind: &'static str, value: String },
}

fn check(kind: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > 64 {
        return Err(IdError::TooLong { kind, value: value.to_owned() });
    }
    if !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err(IdError::BadCharacter { kind, value: value.to_owned() });
    }
    if value == "." || value == ".." {
        return Err(IdError::Dots { kind, value: value.to_owned() });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `value` as this kind of identifier.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check($kind, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }
    };
}

id_type!(
    /// One gateway running one agent.
    DeviceId,
    "device id"
);
id_type!(
    /// One machine watched by an agent (for C-MAPSS replay: one engine unit).
    AssetId,
    "asset id"
);
id_type!(
    /// A model's name in the registry; releases of one name form a monotonic sequence.
    ModelName,
    "model name"
);

impl DeviceId {
    /// Topic levels under `millwright/v1/` that are not devices, and the server's own name on
    /// the broker: no device may be enrolled under them.
    pub const RESERVED: [&'static str; 3] = ["trust", "events", "millwright-server"];

    pub fn is_reserved(&self) -> bool {
        Self::RESERVED.contains(&self.as_str())
    }
}

/// Monotonic release number of a model; a device never accepts a release lower than one it ran.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Release(pub u64);

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_topic_safe_names_and_reject_the_rest() {
        assert!(DeviceId::new("gw-01.plant_a").is_ok());
        assert_eq!(DeviceId::new(""), Err(IdError::Empty { kind: "device id" }));
        assert!(matches!(DeviceId::new("a/b"), Err(IdError::BadCharacter { .. })));
        assert!(matches!(AssetId::new("+"), Err(IdError::BadCharacter { .. })));
        assert!(matches!(ModelName::new("x".repeat(65)), Err(IdError::TooLong { .. })));
        assert!(matches!(ModelName::new(".."), Err(IdError::Dots { .. })));
        assert!(matches!(DeviceId::new("."), Err(IdError::Dots { .. })));
        assert!(DeviceId::new("..a").is_ok());
        assert!(DeviceId::new("trust").unwrap().is_reserved());
    }

    #[test]
    fn ids_are_validated_when_deserialized() {
        let ok: DeviceId = serde_json::from_str("\"gw1\"").unwrap();
        assert_eq!(ok.as_str(), "gw1");
        assert!(serde_json::from_str::<DeviceId>("\"gw/1\"").is_err());
    }
}
