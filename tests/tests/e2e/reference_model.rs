//! The committed reference bundle: tract reproduces onnxruntime's golden outputs.

use millwright_agent::inference::Model;
use millwright_shared::bundle;
use millwright_shared::keys::{PublicKeyFile, TrustedKeys};
use millwright_tests::{BUNDLE, PUBLIC_KEY, repo_file};

#[test]
fn tract_reproduces_the_onnxruntime_golden_outputs_within_1e_4() {
    let key =
        PublicKeyFile::parse(&std::fs::read_to_string(repo_file(PUBLIC_KEY)).unwrap()).unwrap();
    let bytes = std::fs::read(repo_file(BUNDLE)).unwrap();
    let verified =
        bundle::verify(&bytes, &TrustedKeys::new(vec![key], 1), time::OffsetDateTime::now_utc())
            .unwrap();
    let cases = verified.manifest().golden.cases.clone();
    assert!(cases.len() >= 8, "the reference bundle carries {} golden cases", cases.len());
    let mut model = Model::load(&verified).unwrap();
    let mut worst = 0f32;
    for (i, case) in cases.iter().enumerate() {
        let got = model.predict(&case.input).unwrap();
        assert_eq!(got.len(), case.output.len());
        for (g, e) in got.iter().zip(&case.output) {
            let diff = (g - e).abs();
            assert!(diff <= 1e-4, "golden case {i}: tract {g} vs onnxruntime {e}");
            worst = worst.max(diff);
        }
    }
    let batch: Vec<f32> = cases.iter().flat_map(|c| c.input.iter().copied()).collect();
    let batched = model.predict_batch(&batch, cases.len()).unwrap();
    for (i, (row, case)) in batched.iter().zip(&cases).enumerate() {
        assert!((row[0] - case.output[0]).abs() <= 1e-4, "batched golden case {i}");
    }
    println!(
        "reference model: {} golden cases, max |tract - onnxruntime| = {worst:e}",
        cases.len()
    );
}
