//! `millwright verify` and `millwright-agent replay` refuse damaged or mismatched bundles, each
//! with its own message and a non-zero exit, and replay writes nothing.

use ed25519_dalek::SigningKey;
use millwright_shared::bundle::RawBundle;
use millwright_shared::keys::PublicKeyFile;
use millwright_tests::{BUNDLE, PUBLIC_KEY, TEST_DATA, bin, repo_file};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Refusal {
    exit_ok: bool,
    stderr: String,
}

fn verify(bundle: &Path, key: &Path) -> Refusal {
    let out = Command::new(bin("millwright"))
        .arg("verify")
        .arg(bundle)
        .arg("--trusted-key")
        .arg(key)
        .output()
        .unwrap();
    Refusal { exit_ok: out.status.success(), stderr: String::from_utf8_lossy(&out.stderr).into() }
}

fn replay(bundle: &Path, key: &Path, out: &Path) -> Refusal {
    let output = Command::new(bin("millwright-agent"))
        .arg("replay")
        .arg("--bundle")
        .arg(bundle)
        .arg("--trusted-key")
        .arg(key)
        .arg("--cmapss")
        .arg(repo_file(TEST_DATA))
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    Refusal {
        exit_ok: output.status.success(),
        stderr: String::from_utf8_lossy(&output.stderr).into(),
    }
}

/// A bundle signed by a test key from the reference model's manifest, changed by `edit`.
fn resigned(
    dir: &Path,
    name: &str,
    model: Vec<u8>,
    edit: impl FnOnce(&mut millwright_shared::manifest::Manifest),
) -> (PathBuf, PathBuf) {
    let reference = RawBundle::parse(&std::fs::read(repo_file(BUNDLE)).unwrap()).unwrap();
    let mut manifest = reference.manifest_unverified().unwrap();
    edit(&mut manifest);
    let key = SigningKey::from_bytes(&[42; 32]);
    let mut raw = RawBundle::unsigned(manifest, model);
    raw.sign(&key);
    let bundle = dir.join(format!("{name}.mwb"));
    std::fs::write(&bundle, raw.to_bytes()).unwrap();
    let public = dir.join("test-key.pub.json");
    std::fs::write(&public, serde_json::to_vec(&PublicKeyFile::new(&key.verifying_key())).unwrap())
        .unwrap();
    (bundle, public)
}

#[test]
fn verify_and_replay_refuse_each_kind_of_bad_bundle_with_its_own_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = std::fs::read(repo_file(BUNDLE)).unwrap();
    let trusted = repo_file(PUBLIC_KEY);
    let ok = verify(&repo_file(BUNDLE), &trusted);
    assert!(ok.exit_ok, "the reference bundle verifies: {}", ok.stderr);

    let write = |name: &str, bytes: &[u8]| {
        let p = d.join(format!("{name}.mwb"));
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let mut model_flip = good.clone();
    let last = model_flip.len() - 1;
    model_flip[last] ^= 0x01;
    let mut manifest_flip = good.clone();
    manifest_flip[8 + 4 + 40] ^= 0x01;

    let onnx = std::fs::read(repo_file("models/rul-cnn-fd001/model.onnx")).unwrap();
    let (stranger, _) = resigned(d, "stranger", onnx.clone(), |_| {});
    let (not_onnx, test_key) =
        resigned(d, "not-onnx", b"this is a text file, not an ONNX model".to_vec(), |_| {});
    let (wrong_shape, _) = resigned(d, "wrong-shape", onnx, |m| {
        m.input.window = 20;
        for case in &mut m.golden.cases {
            case.input.truncate(20 * m.input.features.len());
        }
    });

    let cases: Vec<(&str, PathBuf, PathBuf, &str)> = vec![
        ("flipped model byte", write("model-flip", &model_flip), trusted.clone(), "model tampered"),
        (
            "flipped manifest byte",
            write("manifest-flip", &manifest_flip),
            trusted.clone(),
            "the manifest was modified",
        ),
        ("unknown signing key", stranger, trusted.clone(), "not signed by any trusted key"),
        (
            "truncated file",
            write("truncated", &good[..good.len() - 100]),
            trusted.clone(),
            "truncated",
        ),
        ("payload not ONNX", not_onnx, test_key.clone(), "not an ONNX model"),
        (
            "input shape contradicts manifest",
            wrong_shape,
            test_key,
            "but the manifest says [batch, 20, 14]",
        ),
    ];
    let mut messages = Vec::new();
    for (what, bundle, key, needle) in &cases {
        let v = verify(bundle, key);
        assert!(!v.exit_ok, "verify accepted a bundle with a {what}");
        assert!(v.stderr.contains(needle), "verify, {what}: expected {needle:?} in {:?}", v.stderr);
        let out = d.join(format!("{what}.jsonl"));
        let r = replay(bundle, key, &out);
        assert!(!r.exit_ok, "replay accepted a bundle with a {what}");
        assert!(r.stderr.contains(needle), "replay, {what}: expected {needle:?} in {:?}", r.stderr);
        assert!(!out.exists(), "replay wrote {} for a bundle with a {what}", out.display());
        messages.push(v.stderr.lines().last().unwrap_or_default().to_owned());
        println!("{what}: {}", v.stderr.trim());
    }
    let mut distinct = messages.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), messages.len(), "messages are not distinct: {messages:#?}");
}
