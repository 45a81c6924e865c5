//! A gateway refuses every kind of bad update on its own: forged, stale or misaddressed
//! directives, damaged transfers, bundles that fail the release keys, manifests that do not fit
//! the directive or the device, models tract cannot run, and root rotations without the old
//! keys. Each refusal names its own reason: what was validly signed but wrong reaches the server
//! as an update report; what did not verify (forged, garbage) or is a replay is counted on the
//! gateway under its own label and logged, and nothing it claims is repeated (at most one
//! report per ten minutes, naming only its digest). The serving model's hash and outputs stay
//! exactly the same. A valid update at the end proves the refusals were not an artefact of the
//! setup.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::SigningKey;
use millwright_shared::DeviceId;
use millwright_shared::bundle::RawBundle;
use millwright_shared::directive::{Directive, MAX_DIRECTIVE_BYTES};
use millwright_shared::topics;
use millwright_shared::trust::{Envelope, KeySet, Root};
use millwright_tests::rogue::{Damage, Rogue};
use millwright_tests::trust::{TrustKit, key, quick_activation};
use millwright_tests::{
    Agent, AgentSpec, BrokerChoice, Server, check_exactly_once, fleet_lock, repo_file,
    wait_for_all, wait_until,
};
use serde_json::Value;
use std::time::Duration;

const DEVICE: &str = "gw-guard";
const MODEL: &str = "rul-cnn-fd001";
const CHUNK: u32 = 16 * 1024;

/// What is sent, and what the refusal must say.
enum Payload {
    /// Raw bytes on the device's `desired` topic.
    Desired(Vec<u8>),
    /// A directive signed by the server key, for a bundle the test party serves.
    Update { directive: Box<Directive>, bundle: Vec<u8>, damage: Damage },
    /// A root document on the fleet's root topic.
    Root(Vec<u8>),
}

struct Case {
    name: &'static str,
    payload: Payload,
    reason: &'static str,
    /// For refusals that never become a report: the counter label the gateway uses.
    label: Option<&'static str>,
}

/// The gateway's refusal counter `label` (from its status file).
fn refused(agent: &Agent, label: &str) -> u64 {
    agent.status().and_then(|s| s["counters"]["refused"][label].as_u64()).unwrap_or(0)
}

fn onnx() -> Vec<u8> {
    std::fs::read(repo_file("models/rul-cnn-fd001/model.onnx")).unwrap()
}

fn rejected(server: &Server) -> Vec<Value> {
    let reports = server.get(&format!("/api/v1/devices/{DEVICE}/updates")).unwrap_or_default();
    reports
        .as_array()
        .map(|a| a.iter().filter(|r| r["phase"] == "rejected").cloned().collect())
        .unwrap_or_default()
}

#[test]
fn every_bad_update_is_refused_with_its_own_reason_and_nothing_changes() {
    let _fleet = fleet_lock();
    let dir = tempfile::tempdir().unwrap();
    let kit = TrustKit::new(&dir.path().join("trust")).unwrap();
    let r1 = kit.release(1).unwrap();
    let r1_path = dir.path().join("r1.mwb");
    std::fs::write(&r1_path, &r1).unwrap();
    let r2 = kit.release(2).unwrap();

    let server = Server::start(dir.path(), BrokerChoice::Embedded).unwrap();
    let mut spec = AgentSpec::replaying(DEVICE, [12, 13], 6.0);
    spec.trust_root = Some(kit.root_path.clone());
    spec.bundle = Some(r1_path);
    spec.updates = Some("max_bundle_bytes = 1048576\nfetch_timeout_secs = 2".into());
    let agent = Agent::start(dir.path(), spec, &server).unwrap();
    let serving_at_start = || agent.serving(MODEL);
    assert!(
        wait_until(Duration::from_secs(30), || serving_at_start().is_some_and(|s| s.0 == 1)),
        "agent did not start on release 1: {}",
        agent.proc.log_text()
    );
    let before = agent.serving(MODEL).unwrap();
    let rogue = Rogue::start(&server, DEVICE, kit.server_key.clone()).unwrap();

    let server_key = &kit.server_key;
    let mut seq = 100;
    let mut next = || {
        seq += 1;
        seq
    };
    let directive = |seq: u64, bundle: &[u8], release: u64| {
        TrustKit::directive(DEVICE, seq, bundle, CHUNK, release, quick_activation()).unwrap()
    };
    let signed = |d: &Directive, k: &SigningKey| d.sign(k).to_bytes();
    let update = |directive: Directive, bundle: Vec<u8>| Payload::Update {
        directive: Box::new(directive),
        bundle,
        damage: Damage::None,
    };
    let bundle_with = |edit: &dyn Fn(&mut millwright_shared::manifest::Manifest)| {
        TrustKit::bundle(TrustKit::manifest(2, edit).unwrap(), onnx(), &kit.release_signers())
    };

    let mut cases = Vec::new();
    let mut add = |name, payload, reason| cases.push(Case { name, payload, reason, label: None });

    // Directives: who signed them, for whom, when, and what they ask.
    add(
        "garbage on the desired topic",
        Payload::Desired(b"\x00\x01 not json".to_vec()),
        "directive is malformed",
    );
    add(
        "directive signed by an unknown key",
        Payload::Desired(signed(&directive(next(), &r2, 2), &key(77))),
        "not signed by a trusted server key",
    );
    add(
        "directive signed by a revoked server key",
        Payload::Desired(signed(&directive(next(), &r2, 2), &kit.revoked_server)),
        "signed by revoked key",
    );
    let tampered = {
        let mut env = directive(next(), &r2, 2).sign(server_key);
        let mut d: Value = serde_json::from_slice(&env.payload_bytes().unwrap()).unwrap();
        d["release"] = 9.into();
        env.payload = BASE64.encode(serde_json::to_vec(&d).unwrap());
        env.to_bytes()
    };
    add("tampered directive", Payload::Desired(tampered), "the directive was modified");
    let mut expired = directive(next(), &r2, 2);
    expired.expires_at = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    add("expired directive", Payload::Desired(signed(&expired, server_key)), "directive expired");
    let mut elsewhere = directive(next(), &r2, 2);
    elsewhere.device = DeviceId::new("gw-other").unwrap();
    add(
        "directive for another device",
        Payload::Desired(signed(&elsewhere, server_key)),
        "addressed to device gw-other",
    );
    let mut v2 = directive(next(), &r2, 2);
    v2.v = 2;
    add(
        "directive of an unknown version",
        Payload::Desired(signed(&v2, server_key)),
        "version 2 is not supported",
    );
    let mut plan = directive(next(), &r2, 2);
    plan.bundle.chunks.pop();
    add(
        "inconsistent chunk plan",
        Payload::Desired(signed(&plan, server_key)),
        "chunk plan is inconsistent",
    );
    let mut huge = directive(next(), &r2, 2);
    huge.bundle.size = 8 << 20;
    huge.bundle.chunk_size = 1 << 20;
    huge.bundle.chunks = vec!["a".repeat(64); 8];
    add(
        "oversized transfer",
        Payload::Desired(signed(&huge, server_key)),
        "above this device's limit",
    );
    let old_release = TrustKit::bundle(
        TrustKit::manifest(1, |m| m.version = "r1-rebuilt".into()).unwrap(),
        onnx(),
        &kit.release_signers(),
    );
    let rollback_seq = next();
    add(
        "rollback to the serving release",
        update(directive(rollback_seq, &old_release, 1), old_release.clone()),
        "rollback refused",
    );
    // A signed revert may only go back to the gateway's own last known good release (this one
    // has none: it was provisioned with release 1), never to a bundle of the server's choosing.
    let mut revert = directive(next(), &old_release, 1);
    revert.action = millwright_shared::directive::Action::Revert;
    add(
        "revert to a release that is not the last known good",
        Payload::Update {
            directive: Box::new(revert),
            bundle: old_release.clone(),
            damage: Damage::None,
        },
        "neither the last known good release",
    );
    add(
        "replayed old directive",
        Payload::Desired(signed(&directive(rollback_seq - 3, &r2, 2), server_key)),
        "is a replay",
    );

    // The transfer: chunks that do not match the signed plan.
    add(
        "chunks with a bad hash",
        Payload::Update {
            directive: Box::new(directive(next(), &r2, 2)),
            bundle: r2.clone(),
            damage: Damage::FlipBytes,
        },
        "does not match its SHA-256",
    );
    add(
        "chunks longer than the plan",
        Payload::Update {
            directive: Box::new(directive(next(), &r2, 2)),
            bundle: r2.clone(),
            damage: Damage::Oversize,
        },
        "the directive says",
    );

    // Bundles: container, release signatures, manifest.
    let truncated = r2[..r2.len() - 100].to_vec();
    add(
        "truncated bundle",
        update(directive(next(), &truncated, 2), truncated),
        "bundle is truncated",
    );
    let junk: Vec<u8> =
        (0..40_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    add("not a bundle at all", update(directive(next(), &junk, 2), junk), "bad magic bytes");
    let mut model_flip = r2.clone();
    let last = model_flip.len() - 1;
    model_flip[last] ^= 1;
    add("tampered model", update(directive(next(), &model_flip, 2), model_flip), "model tampered");
    let mut manifest_flip = r2.clone();
    manifest_flip[8 + 4 + 40] ^= 1;
    add(
        "tampered manifest",
        update(directive(next(), &manifest_flip, 2), manifest_flip),
        "the manifest was modified",
    );
    let strangers =
        TrustKit::bundle(TrustKit::manifest(2, |_| {}).unwrap(), onnx(), &[&key(81), &key(82)]);
    add(
        "signed by unknown keys",
        update(directive(next(), &strangers, 2), strangers),
        "not signed by any trusted key",
    );
    let revoked = TrustKit::bundle(
        TrustKit::manifest(2, |_| {}).unwrap(),
        onnx(),
        &[&kit.release_keys[0], &kit.revoked_release],
    );
    add(
        "signed with a revoked release key",
        update(directive(next(), &revoked, 2), revoked),
        "signed by revoked key",
    );
    let one =
        TrustKit::bundle(TrustKit::manifest(2, |_| {}).unwrap(), onnx(), &[&kit.release_keys[2]]);
    add(
        "signatures below threshold",
        update(directive(next(), &one, 2), one),
        "1 valid trusted signature(s), 2 required",
    );
    let stale = bundle_with(&|m| {
        m.created_at -= time::Duration::days(60);
        m.expires_at = m.created_at + time::Duration::days(30);
    });
    add("expired manifest", update(directive(next(), &stale, 2), stale), "bundle expired");
    let mixed = {
        let a = RawBundle::parse(&r2).unwrap();
        let mut other = onnx();
        other.extend_from_slice(b"\x00\x00");
        RawBundle { model: other, ..a }.to_bytes()
    };
    add(
        "manifest of one release with another model",
        update(directive(next(), &mixed, 2), mixed),
        "the signed manifest says",
    );
    add(
        "directive names another release",
        update(directive(next(), &r2, 5), r2.clone()),
        "bundle holds release 2, the directive names release 5",
    );
    let pump = bundle_with(&|m| m.asset_type = "pump".into());
    add("wrong asset type", update(directive(next(), &pump, 2), pump), "asset type \"pump\"");
    let plc = bundle_with(&|m| m.device_classes = vec!["armv7-plc".into()]);
    add(
        "wrong device class",
        update(directive(next(), &plc, 2), plc),
        "device classes [\"armv7-plc\"]",
    );
    let not_onnx = TrustKit::bundle(
        TrustKit::manifest(2, |_| {}).unwrap(),
        b"this is a text file, not an ONNX model".to_vec(),
        &kit.release_signers(),
    );
    add(
        "payload is not ONNX",
        update(directive(next(), &not_onnx, 2), not_onnx),
        "not an ONNX model",
    );
    let shape = TrustKit::bundle(
        TrustKit::manifest(2, |_| {}).unwrap(),
        millwright_tests::variants::wrong_input_shape(),
        &kit.release_signers(),
    );
    add(
        "graph input shape contradicts the manifest",
        update(directive(next(), &shape, 2), shape),
        "but the manifest says [batch, 30, 14]",
    );
    let narrow = bundle_with(&|m| {
        m.input.window = 20;
        for case in &mut m.golden.cases {
            case.input.truncate(20 * m.input.features.len());
        }
    });
    add(
        "input differs from the serving model",
        update(directive(next(), &narrow, 2), narrow),
        "differs from the running model's",
    );
    let wrong_golden = bundle_with(&|m| m.golden.cases[0].output[0] += 5.0);
    add(
        "golden outputs not reproduced",
        update(directive(next(), &wrong_golden, 2), wrong_golden),
        "golden case 0",
    );

    // Roots: a rotation needs the current root keys, its own threshold and the next version.
    let new_keys = [key(4), key(5), key(6)];
    let rotated = |version: u64, signers: &[&SigningKey]| {
        let mut m = kit.metadata(version, &[&new_keys[0], &new_keys[1], &new_keys[2]]);
        m.root = KeySet::of(&new_keys.iter().map(|k| k.verifying_key()).collect::<Vec<_>>(), 2);
        Root::sign(&m, signers).to_bytes()
    };
    add(
        "root rotation without the old keys",
        Payload::Root(rotated(2, &[&new_keys[0], &new_keys[1]])),
        "by the current root keys, 2 required",
    );
    add(
        "root rotation below its own threshold",
        Payload::Root(rotated(2, &[&kit.root_keys[0], &kit.root_keys[1], &new_keys[0]])),
        "by the new root keys, 2 required",
    );
    add(
        "root rotation skipping a version",
        Payload::Root(rotated(
            3,
            &[&kit.root_keys[0], &kit.root_keys[1], &new_keys[0], &new_keys[1]],
        )),
        "not the next version after 1",
    );
    let mut replayed = kit.metadata(1, &[&kit.root_keys[0], &kit.root_keys[1], &kit.root_keys[2]]);
    replayed.expires_at += time::Duration::days(1);
    add(
        "root of the current version, different content",
        Payload::Root(Root::sign(&replayed, &[&kit.root_keys[0], &kit.root_keys[1]]).to_bytes()),
        "root version 1 is not the next version after 1",
    );
    let oversized_root = Envelope { payload: "A".repeat(MAX_DIRECTIVE_BYTES), signatures: vec![] };
    add("oversized root document", Payload::Root(oversized_root.to_bytes()), "above the limit");

    // What does not verify, or is a replay, is counted under its own label, not reported.
    for case in &mut cases {
        case.label = match case.name {
            "garbage on the desired topic" => Some("directive_malformed"),
            "directive signed by an unknown key" => Some("directive_untrusted_signer"),
            "directive signed by a revoked server key" => Some("directive_revoked_key"),
            "tampered directive" => Some("directive_bad_signature"),
            "directive for another device" => Some("directive_wrong_device"),
            "replayed old directive" => Some("directive_replayed"),
            "root rotation without the old keys" | "root rotation below its own threshold" => {
                Some("root_signatures")
            }
            "root rotation skipping a version"
            | "root of the current version, different content" => Some("root_version"),
            "oversized root document" => Some("root_too_large"),
            _ => None,
        };
    }
    assert!(cases.len() >= 25, "only {} vectors", cases.len());
    let mut seen_reasons = Vec::new();
    let mut logged_labels = Vec::new();
    let mut refused_here = 0;
    for case in cases {
        let count = rejected(&server).len();
        let before_refused = case.label.map(|l| refused(&agent, l));
        match case.payload {
            Payload::Desired(bytes) => rogue
                .publish_retained(topics::desired(&DeviceId::new(DEVICE).unwrap()), bytes)
                .unwrap(),
            Payload::Update { directive, bundle, damage } => {
                rogue.offer(&bundle, CHUNK, damage);
                let bytes = signed(&directive, server_key);
                rogue.publish_retained(topics::desired(&directive.device), bytes).unwrap();
            }
            Payload::Root(bytes) => {
                rogue.publish_retained(topics::TRUST_ROOT.into(), bytes).unwrap()
            }
        }
        if let (Some(label), Some(before)) = (case.label, before_refused) {
            let counted = wait_until(Duration::from_secs(30), || refused(&agent, label) > before);
            assert!(
                counted,
                "{}: not counted as {label}: {}\n{}",
                case.name,
                agent.status().unwrap()["counters"]["refused"],
                agent.proc.log_text()
            );
            // Each label is logged once (not per message), with its reason.
            if !logged_labels.contains(&label) {
                let log = agent.proc.log_text();
                let line = log.lines().find(|l| l.contains(label) && l.contains(case.reason));
                assert!(
                    line.is_some(),
                    "{}: no log line with {label} and {:?}:\n{log}",
                    case.name,
                    case.reason
                );
                logged_labels.push(label);
            }
            println!("{:<45} → refused on the gateway: {label}", case.name);
            refused_here += 1;
            // The first refusal that did not verify is reported, with nothing it claimed.
            if case.name == "garbage on the desired topic" {
                let reported =
                    wait_until(Duration::from_secs(30), || rejected(&server).len() > count);
                assert!(reported, "the first unverified refusal was not reported");
                let report = rejected(&server).pop().unwrap();
                assert!(report["directive"].is_null() && report["rollout"].is_null(), "{report}");
                assert!(report["reason"].as_str().unwrap().contains("message SHA-256"), "{report}");
            }
        } else {
            let arrived = wait_until(Duration::from_secs(30), || rejected(&server).len() > count);
            assert!(
                arrived,
                "{}: no rejection reached the server; agent log:\n{}",
                case.name,
                agent.proc.log_text()
            );
            let report = rejected(&server).pop().unwrap();
            let reason = report["reason"].as_str().unwrap_or_default().to_owned();
            println!("{:<45} → {reason}", case.name);
            assert!(
                reason.contains(case.reason),
                "{}: expected {:?} in {reason:?}",
                case.name,
                case.reason
            );
            seen_reasons.push(reason);
        }
        assert_eq!(
            agent.serving(MODEL),
            Some(before.clone()),
            "{}: the serving model changed",
            case.name
        );
        // status.json is rewritten every second; give it a moment.
        let settled = wait_until(Duration::from_secs(3), || {
            agent.status().is_some_and(|s| s["update"].is_null())
        });
        assert!(
            settled,
            "{}: an update is still in progress: {}",
            case.name,
            agent.status().unwrap()["update"]
        );
    }
    let mut distinct = seen_reasons.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), seen_reasons.len(), "reasons are not distinct: {seen_reasons:#?}");
    println!(
        "{} bad updates reported with their own reason, {} refused on the gateway under {} labels",
        seen_reasons.len(),
        refused_here,
        logged_labels.len()
    );

    // The control: a good release through the same path is accepted.
    rogue.offer(&r2, CHUNK, Damage::None);
    let good = directive(next(), &r2, 2);
    rogue.publish_retained(topics::desired(&good.device), signed(&good, server_key)).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || agent.serving(MODEL).is_some_and(|s| s.0 == 2)),
        "the valid release 2 was not installed: {}",
        agent.proc.log_text()
    );
    assert_eq!(agent.serving(MODEL).unwrap().1, before.1, "release 2 carries the same ONNX");
    let committed = wait_until(Duration::from_secs(30), || {
        let reports = server.get(&format!("/api/v1/devices/{DEVICE}/updates")).unwrap_or_default();
        reports
            .as_array()
            .is_some_and(|a| a.iter().any(|r| r["phase"] == "committed" && r["release"] == 2))
    });
    assert!(committed, "no committed report for release 2 reached the server");

    // And a proper rotation (next version, old and new root keys) is accepted.
    let good_root = rotated(2, &[&kit.root_keys[0], &kit.root_keys[2], &new_keys[1], &new_keys[2]]);
    rogue.publish_retained(topics::TRUST_ROOT.into(), good_root).unwrap();
    let rotated_ok = wait_until(Duration::from_secs(20), || {
        agent.status().is_some_and(|s| s["trust_root_version"] == 2)
    });
    assert!(rotated_ok, "the valid root rotation was not accepted: {}", agent.proc.log_text());
    let reported = wait_until(Duration::from_secs(20), || {
        let reports = server.get(&format!("/api/v1/devices/{DEVICE}/updates")).unwrap_or_default();
        reports.as_array().is_some_and(|a| a.iter().any(|r| r["phase"] == "root_rotated"))
    });
    assert!(reported, "the rotation was not reported to the server");

    // Every prediction, before, during and after all of this, is the reference model's.
    wait_for_all(&server, &[&agent], Duration::from_secs(120)).unwrap();
    let n = check_exactly_once(&server, &agent).unwrap();
    println!("{n} predictions bit-equal to the reference replay");
}
