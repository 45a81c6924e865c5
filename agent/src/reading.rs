//! Readings, whatever source they come from: one sample per monitored feature, each a value or
//! why there is none. A prediction needs every model feature present and finite; drift
//! monitoring also counts the readings that lack one.
//!
//! Readings arriving as JSON on a local MQTT topic are parsed here:
//! `{"cycle": 42, "values": {"s2": 642.1, "s3": 1589.7, ...}}`. `cycle` is optional (the agent
//! then counts on from the last one).

use serde_json::Value;

/// One feature's value as it arrived.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sample {
    Value(f32),
    Missing,
    NotANumber,
    NonFinite,
    /// The source could not read it (a PLC that timed out, refused or is unreachable).
    Unavailable(Fault),
}

/// Why a source has no value for a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("the request timed out")]
    Timeout,
    #[error("the device answered with an exception")]
    Exception,
    #[error("the device is not connected")]
    Disconnected,
    #[error("the device's answer did not fit the request")]
    BadResponse,
}

impl Fault {
    pub fn kind(self) -> &'static str {
        match self {
            Fault::Timeout => "input_timeout",
            Fault::Exception => "input_exception",
            Fault::Disconnected => "input_disconnected",
            Fault::BadResponse => "input_bad_response",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub cycle: Option<u64>,
    /// One sample per requested feature, in that order.
    pub samples: Vec<Sample>,
}

/// Why a payload was not accepted as a reading. `kind()` names the counter it is counted under.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadingError {
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    #[error("payload is not a JSON object with a \"values\" object")]
    NoValues,
    #[error("\"cycle\" is not an integer from 0 to 2^63-1")]
    BadCycle,
    #[error("feature {0:?} is missing")]
    Missing(String),
    #[error("feature {0:?} is not a number")]
    NotANumber(String),
    #[error("feature {0:?} is NaN or infinite")]
    NonFinite(String),
    #[error("feature {0:?} is unavailable: {1}")]
    Unavailable(String, Fault),
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
            ReadingError::Unavailable(_, fault) => fault.kind(),
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
        // The outbox and the server store cycles as SQLite integers (i64): a larger one is
        // refused here rather than failing every later commit.
        Some(c) => {
            Some(c.as_u64().filter(|&c| i64::try_from(c).is_ok()).ok_or(ReadingError::BadCycle)?)
        }
    };
    let samples = features
        .into_iter()
        .map(|name| match values.get(name) {
            None => Sample::Missing,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(x) if (x as f32).is_finite() => Sample::Value(x as f32),
                Some(_) => Sample::NonFinite,
                None => Sample::NotANumber,
            },
            Some(Value::String(s)) if s.parse::<f64>().is_ok_and(|x| !x.is_finite()) => {
                Sample::NonFinite
            }
            Some(_) => Sample::NotANumber,
        })
        .collect();
    Ok(Reading { cycle, samples })
}

impl Reading {
    /// The values at `indices` (the model's inputs), all finite, or why not; `names` are the
    /// requested features' names, for the error.
    pub fn values(&self, indices: &[usize], names: &[String]) -> Result<Vec<f32>, ReadingError> {
        indices
            .iter()
            .map(|&i| {
                let name = || names.get(i).cloned().unwrap_or_default();
                match self.samples.get(i) {
                    Some(Sample::Value(v)) => Ok(*v),
                    Some(Sample::NonFinite) => Err(ReadingError::NonFinite(name())),
                    Some(Sample::NotANumber) => Err(ReadingError::NotANumber(name())),
                    Some(Sample::Unavailable(fault)) => {
                        Err(ReadingError::Unavailable(name(), *fault))
                    }
                    Some(Sample::Missing) | None => Err(ReadingError::Missing(name())),
                }
            })
            .collect()
    }

    /// What drift monitoring sees: a value, NaN for a non-finite one, `None` where the reading
    /// had no usable number.
    pub fn for_drift(&self) -> Vec<Option<f32>> {
        self.samples
            .iter()
            .map(|s| match s {
                Sample::Value(v) => Some(*v),
                Sample::NonFinite => Some(f32::NAN),
                Sample::Missing | Sample::NotANumber | Sample::Unavailable(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: [&str; 2] = ["s2", "s3"];

    fn model_values(p: &[u8]) -> Result<Vec<f32>, ReadingError> {
        let names: Vec<String> = F.iter().map(|s| s.to_string()).collect();
        parse(p, F)?.values(&[0, 1], &names)
    }

    #[test]
    fn accepts_a_complete_reading_in_feature_order() {
        let r = parse(br#"{"cycle": 7, "values": {"s3": 2.5, "s2": 1, "extra": "x"}}"#, F).unwrap();
        assert_eq!(r.cycle, Some(7));
        assert_eq!(r.values(&[0, 1], &[]).unwrap(), vec![1.0, 2.5]);
        assert_eq!(r.values(&[1], &[]).unwrap(), vec![2.5]);
        assert_eq!(parse(br#"{"values": {"s3": 2, "s2": 1}}"#, F).unwrap().cycle, None);
    }

    #[test]
    fn names_each_kind_of_garbage() {
        let kind = |p: &[u8]| model_values(p).unwrap_err().kind();
        assert_eq!(kind(b"\xff\xfe garbage"), "not_json");
        assert_eq!(kind(br#"{"values": {"s2": NaN, "s3": 1}}"#), "not_json");
        assert_eq!(kind(br#"[1, 2]"#), "no_values");
        assert_eq!(kind(br#"{"cycle": -1, "values": {}}"#), "bad_cycle");
        assert_eq!(kind(br#"{"cycle": 9223372036854775808, "values": {}}"#), "bad_cycle");
        let largest = br#"{"cycle": 9223372036854775807, "values": {"s2": 1, "s3": 1}}"#;
        assert_eq!(parse(largest, F).unwrap().cycle, Some(i64::MAX as u64));
        assert_eq!(kind(br#"{"values": {"s2": 1}}"#), "missing_feature");
        assert_eq!(kind(br#"{"values": {"s2": "hot", "s3": 1}}"#), "not_a_number");
        assert_eq!(kind(br#"{"values": {"s2": "NaN", "s3": 1}}"#), "non_finite");
        assert_eq!(kind(br#"{"values": {"s2": 1e999, "s3": 1}}"#), "not_json");
        assert_eq!(kind(br#"{"values": {"s2": 1e300, "s3": 1}}"#), "non_finite");
    }

    #[test]
    fn drift_sees_missing_and_non_finite_values_apart() {
        let r = parse(br#"{"values": {"s2": "NaN", "s4": "hot"}}"#, ["s2", "s3", "s4"]).unwrap();
        let d = r.for_drift();
        assert!(d[0].is_some_and(f32::is_nan));
        assert_eq!((d[1], d[2]), (None, None));
    }
}
