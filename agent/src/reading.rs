//! Sensor readings arriving as JSON on a local MQTT topic:
//! `{"cycle": 42, "values": {"s2": 642.1, "s3": 1589.7, ...}}`. `cycle` is optional (the agent
//! then counts on from the last one); every feature the model needs must be present and finite.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub cycle: Option<u64>,
    /// In the model's feature order.
    pub values: Vec<f32>,
}

/// Why a payload was not accepted as a reading. `kind()` names the counter it is counted under.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadingError {
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    #[error("payload is not a JSON object with a \"values\" object")]
    NoValues,
    #[error("\"cycle\" is not a non-negative integer")]
    BadCycle,
    #[error("feature {0:?} is missing")]
    Missing(String),
    #[error("feature {0:?} is not a number")]
    NotANumber(String),
    #[error("feature {0:?} is NaN or infinite")]
    NonFinite(String),
}

impl ReadingError {
    pub fn kind(&self) -> &'static str {
        match self {
            ReadingError::NotJson(_) => "not_json",
            ReadingError::NoValues => "no_values",
            ReadingError::BadCycle => "bad_cycle",
            ReadingError::Missing(_) => "missing_feature",
            ReadingError::NotANumber(_) => "not_a_number",
            ReadingError::NonFinite(_) => "non_finite",
        }
    }
}

pub fn parse<'a>(
    payload: &[u8],
    features: impl IntoIterator<Item = &'a str>,
) -> Result<Reading, ReadingError> {
    let doc: Value =
        serde_json::from_slice(payload).map_err(|e| ReadingError::NotJson(e.to_string()))?;
    let values = doc.get("values").and_then(Value::as_object).ok_or(ReadingError::NoValues)?;
    let cycle = match doc.get("cycle") {
        None | Some(Value::Null) => None,
        Some(c) => Some(c.as_u64().ok_or(ReadingError::BadCycle)?),
    };
    let values = features
        .into_iter()
        .map(|name| {
            let value = values.get(name).ok_or_else(|| ReadingError::Missing(name.to_owned()))?;
            match value {
                Value::Number(n) => {
                    let x = n.as_f64().ok_or_else(|| ReadingError::NotANumber(name.to_owned()))?;
                    let x = x as f32;
                    if x.is_finite() {
                        Ok(x)
                    } else {
                        Err(ReadingError::NonFinite(name.to_owned()))
                    }
                }
                Value::String(s) if s.parse::<f64>().is_ok_and(|x| !x.is_finite()) => {
                    Err(ReadingError::NonFinite(name.to_owned()))
                }
                _ => Err(ReadingError::NotANumber(name.to_owned())),
            }
        })
        .collect::<Result<Vec<f32>, _>>()?;
    Ok(Reading { cycle, values })
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: [&str; 2] = ["s2", "s3"];

    #[test]
    fn accepts_a_complete_reading_in_feature_order() {
        let r = parse(br#"{"cycle": 7, "values": {"s3": 2.5, "s2": 1, "extra": "x"}}"#, F).unwrap();
        assert_eq!(r, Reading { cycle: Some(7), values: vec![1.0, 2.5] });
        assert_eq!(parse(br#"{"values": {"s3": 2, "s2": 1}}"#, F).unwrap().cycle, None);
    }

    #[test]
    fn names_each_kind_of_garbage() {
        let kind = |p: &[u8]| parse(p, F).unwrap_err().kind();
        assert_eq!(kind(b"\xff\xfe garbage"), "not_json");
        assert_eq!(kind(br#"{"values": {"s2": NaN, "s3": 1}}"#), "not_json");
        assert_eq!(kind(br#"[1, 2]"#), "no_values");
        assert_eq!(kind(br#"{"cycle": -1, "values": {}}"#), "bad_cycle");
        assert_eq!(kind(br#"{"values": {"s2": 1}}"#), "missing_feature");
        assert_eq!(kind(br#"{"values": {"s2": "hot", "s3": 1}}"#), "not_a_number");
        assert_eq!(kind(br#"{"values": {"s2": "NaN", "s3": 1}}"#), "non_finite");
        assert_eq!(kind(br#"{"values": {"s2": 1e999, "s3": 1}}"#), "not_json");
        assert_eq!(kind(br#"{"values": {"s2": 1e300, "s3": 1}}"#), "non_finite");
    }
}
