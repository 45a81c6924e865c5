//! The rollout fixtures (`millwright_tests::variants`): every variant is validly signed and
//! passes or fails the agent's loader as intended, and on the committed test data each one
//! computes what its name promises.

use ed25519_dalek::SigningKey;
use millwright_agent::inference::{LoadError, Model};
use millwright_shared::bundle;
use millwright_shared::keys::{PublicKeyFile, TrustedKeys};
use millwright_tests::variants::{self, signed_bundle, trusted_keys};
use millwright_tests::{BUNDLE, PUBLIC_KEY, repo_file};
use prost::Message as _;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tract_onnx::pb::ModelProto;

const OFFSET: f32 = 0.5;
const DISAGREEMENT: f32 = 40.0;
const NAN_ABOVE: f32 = 100.0;
const SLOWER: f32 = 10.0;

fn keys() -> [SigningKey; 2] {
    [SigningKey::from_bytes(&[11; 32]), SigningKey::from_bytes(&[12; 32])]
}

/// `onnx` in a bundle signed by both test keys, through `verify` and the agent's loader.
fn load(onnx: &[u8], release: u64) -> Result<Model, LoadError> {
    let [a, b] = keys();
    let bytes = signed_bundle(onnx, release, &[&a, &b], |_| {}).unwrap();
    let verified = bundle::verify(&bytes, &trusted_keys(&[&a, &b]), OffsetDateTime::now_utc())
        .expect("a fixture bundle verifies");
    assert_eq!(verified.manifest().release.0, release);
    Model::load(&verified)
}

fn reference() -> Model {
    let key =
        PublicKeyFile::parse(&std::fs::read_to_string(repo_file(PUBLIC_KEY)).unwrap()).unwrap();
    let bytes = std::fs::read(repo_file(BUNDLE)).unwrap();
    let trusted = TrustedKeys::new(vec![key], 1);
    Model::load(&bundle::verify(&bytes, &trusted, OffsetDateTime::now_utc()).unwrap()).unwrap()
}

fn outputs(model: &mut Model, windows: &[Vec<f32>]) -> Vec<f32> {
    windows.iter().map(|w| model.predict(w).unwrap()[0]).collect()
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn op_count(onnx: &[u8], op: &str) -> usize {
    let model = ModelProto::decode(onnx).unwrap();
    model.graph.unwrap().node.iter().filter(|n| n.op_type == op).count()
}

fn timed(model: &mut Model, window: &[f32]) -> Duration {
    let start = Instant::now();
    model.predict(window).unwrap();
    start.elapsed()
}

/// Median time of one `predict` of `a` and of `b`, taking turns window by window so that
/// load from other processes hits both alike.
fn median_latencies(a: &mut Model, b: &mut Model, windows: &[Vec<f32>]) -> (Duration, Duration) {
    let (mut ta, mut tb): (Vec<Duration>, Vec<Duration>) =
        windows.iter().map(|w| (timed(a, w), timed(b, w))).unzip();
    ta.sort();
    tb.sort();
    (ta[ta.len() / 2], tb[tb.len() / 2])
}

#[test]
fn every_variant_is_validly_signed_and_the_loader_accepts_or_refuses_it_as_intended() {
    for (name, onnx) in [
        ("healthy", variants::healthy(OFFSET)),
        ("disagreeing", variants::disagreeing(DISAGREEMENT)),
        ("nan_on_live_data", variants::nan_on_live_data(NAN_ABOVE)),
        ("slow", variants::slow(SLOWER)),
    ] {
        if let Err(e) = load(&onnx, 2) {
            panic!("{name} is refused: {e}");
        }
    }
    assert!(matches!(
        load(&variants::wrong_input_shape(), 2),
        Err(LoadError::ShapeMismatch { .. })
    ));
    assert!(matches!(load(&variants::not_onnx(), 2), Err(LoadError::NotOnnx(_))));
}

#[test]
fn an_offset_variant_keeps_its_distance_from_the_reference_on_every_test_window() {
    let windows = variants::test_windows().unwrap();
    assert!(windows.len() > 500, "{} windows", windows.len());
    let want = outputs(&mut reference(), &windows);
    let healthy = outputs(&mut load(&variants::healthy(OFFSET), 2).unwrap(), &windows);
    let disagreeing =
        outputs(&mut load(&variants::disagreeing(DISAGREEMENT), 2).unwrap(), &windows);
    for ((r, h), d) in want.iter().zip(&healthy).zip(&disagreeing) {
        assert!((h - r).abs() <= OFFSET + 1e-3, "healthy {h} vs reference {r}");
        assert!(((d - r) - DISAGREEMENT).abs() <= 1e-3, "disagreeing {d} vs reference {r}");
    }
}

#[test]
fn the_nan_variant_fails_on_most_live_windows_but_passes_its_golden_cases() {
    let windows = variants::test_windows().unwrap();
    let [a, b] = keys();
    let bytes =
        signed_bundle(&variants::nan_on_live_data(NAN_ABOVE), 2, &[&a, &b], |_| {}).unwrap();
    let verified =
        bundle::verify(&bytes, &trusted_keys(&[&a, &b]), OffsetDateTime::now_utc()).unwrap();
    let golden = verified.manifest().golden.cases.clone();
    let mut model = Model::load(&verified).unwrap();
    let got = outputs(&mut model, &windows);
    let nan = got.iter().filter(|v| v.is_nan()).count();
    println!(
        "nan_on_live_data({NAN_ABOVE}): NaN on {nan} of {} test windows ({:.0}%), finite on all \
         {} remaining golden cases",
        got.len(),
        100.0 * nan as f64 / got.len() as f64,
        golden.len()
    );
    assert!(nan * 2 > got.len(), "NaN on only {nan} of {} windows", got.len());
    assert!(!golden.is_empty());
    for case in &golden {
        assert!(model.predict(&case.input).unwrap()[0].is_finite());
    }
    let want = outputs(&mut reference(), &windows);
    for (g, r) in got.iter().zip(&want) {
        assert_eq!(g.is_nan(), *r > NAN_ABOVE, "reference {r}, variant {g}");
    }
}

#[test]
fn the_slow_variant_adds_real_work_but_not_to_its_outputs() {
    let onnx = variants::slow(SLOWER);
    let extra = op_count(&onnx, "MatMul") - op_count(&variants::reference_onnx(), "MatMul");
    assert!(extra >= variants::slow_links(SLOWER), "only {extra} extra MatMul nodes");

    let windows = variants::test_windows().unwrap();
    let mut reference = reference();
    let mut slow = load(&onnx, 2).unwrap();
    let (want, got) = (outputs(&mut reference, &windows), outputs(&mut slow, &windows));
    let worst = max_difference(&want, &got);
    assert!(worst <= 1e-3, "slow differs from the reference by {worst}");

    let sample = &windows[..windows.len().min(1000)];
    let (base, slowed) = median_latencies(&mut reference, &mut slow, sample);
    println!(
        "latency per window (median of {} predictions): reference {base:?}, slow({SLOWER}) \
         {slowed:?}, ratio {:.1}; max |slow - reference| = {worst:e}",
        sample.len(),
        slowed.as_secs_f64() / base.as_secs_f64()
    );
}
