//! Health levels from a model's output, with hysteresis so a value hovering at a threshold does
//! not flap.

use millwright_shared::manifest::{AlertThresholds, OutputKind};
use millwright_shared::wire::Level;

fn threshold(t: &AlertThresholds, level: Level) -> f32 {
    match level {
        Level::Alarm => t.alarm,
        Level::Warning | Level::Ok => t.warning,
    }
}

/// `value` is at least as bad as `threshold`.
fn reaches(kind: OutputKind, value: f32, threshold: f32) -> bool {
    match kind {
        OutputKind::RemainingUsefulLife => value <= threshold,
        OutputKind::AnomalyScore => value >= threshold,
    }
}

/// `value` is better than `threshold` by more than `margin`.
fn clears(kind: OutputKind, value: f32, threshold: f32, margin: f32) -> bool {
    match kind {
        OutputKind::RemainingUsefulLife => value > threshold + margin,
        OutputKind::AnomalyScore => value < threshold - margin,
    }
}

fn lower(level: Level) -> Level {
    match level {
        Level::Alarm => Level::Warning,
        Level::Warning | Level::Ok => Level::Ok,
    }
}

/// The level after observing `value` in level `current`. Escalation is immediate; each step
/// down needs the value to clear that level's threshold by the hysteresis margin. A non-finite
/// value changes nothing.
pub fn next_level(current: Level, value: f32, kind: OutputKind, t: &AlertThresholds) -> Level {
    if !value.is_finite() {
        return current;
    }
    let raw = if reaches(kind, value, t.alarm) {
        Level::Alarm
    } else if reaches(kind, value, t.warning) {
        Level::Warning
    } else {
        Level::Ok
    };
    if raw >= current {
        return raw;
    }
    let mut level = current;
    while level > raw && clears(kind, value, threshold(t, level), t.hysteresis) {
        level = lower(level);
    }
    level
}

#[cfg(test)]
mod tests {
    use super::*;
    use Level::*;

    const T: AlertThresholds = AlertThresholds { warning: 50.0, alarm: 20.0, hysteresis: 5.0 };

    fn run(kind: OutputKind, values: &[f32]) -> Vec<Level> {
        let mut level = Ok;
        values
            .iter()
            .map(|&v| {
                level = next_level(level, v, kind, &T);
                level
            })
            .collect()
    }

    #[test]
    fn remaining_life_levels_rise_at_once_and_fall_only_past_the_hysteresis() {
        let rul = OutputKind::RemainingUsefulLife;
        assert_eq!(
            run(rul, &[80.0, 50.0, 53.0, 55.0, 56.0, 19.0, 24.0, 26.0, 60.0]),
            vec![Ok, Warning, Warning, Warning, Ok, Alarm, Alarm, Warning, Ok]
        );
    }

    #[test]
    fn anomaly_scores_are_mirrored() {
        let t = AlertThresholds { warning: 0.5, alarm: 0.8, hysteresis: 0.1 };
        let mut level = Ok;
        for (v, want) in [(0.55, Warning), (0.9, Alarm), (0.75, Alarm), (0.65, Warning), (0.3, Ok)]
        {
            level = next_level(level, v, OutputKind::AnomalyScore, &t);
            assert_eq!(level, want, "value {v}");
        }
    }

    #[test]
    fn a_nan_prediction_keeps_the_current_level() {
        assert_eq!(next_level(Alarm, f32::NAN, OutputKind::RemainingUsefulLife, &T), Alarm);
    }
}
