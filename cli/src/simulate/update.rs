//! A simulated gateway's side of a rollout (pure): the directive it works on, the chunks that
//! arrived, the phases it reports and when. The gateway task feeds it what came over MQTT
//! (already checked against the server's signatures) and the time, and carries out what it
//! returns. A real agent's steps take as long as its shadow and probation periods; the
//! download, verification and self-test are instant here, and a gateway told to fail is
//! rejected after verification, as an agent whose self-test does not reproduce the golden
//! cases is.

use millwright_shared::bundle::sha256_hex;
use millwright_shared::directive::{Action, Directive};
use millwright_shared::wire::{Chunk, UpdatePhase, UpdateReport};
use std::collections::BTreeSet;

/// Chunks asked for in one request (the server sends at most 16).
const CHUNKS_PER_REQUEST: u32 = 16;
/// Missing chunks are asked for again after this long.
const REFETCH_US: u64 = 10_000_000;

/// What the gateway must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    /// Ask for chunks `first .. first + count`.
    Fetch { first: u32, count: u32 },
    /// Send this step (in the update stream, until acknowledged).
    Report(Box<UpdateReport>),
    /// The release this gateway serves from now on (its status says so).
    Serving(u64),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stage {
    Downloading { asked_us: u64 },
    Shadow { until_us: u64 },
    Probation { until_us: u64 },
    Done,
}

/// The update a directive started.
#[derive(Debug)]
pub struct Update {
    directive: Directive,
    missing: BTreeSet<u32>,
    fail: bool,
    stage: Stage,
}

impl Update {
    /// A directive that verified: a revert is done at once (the previous release is still on
    /// the gateway); an install reports `received` and asks for every chunk.
    pub fn start(directive: Directive, fail: bool, now_us: u64) -> (Update, Vec<Out>) {
        let chunks = directive.bundle.chunks.len() as u32;
        let mut update = Update {
            missing: (0..chunks).collect(),
            fail,
            stage: Stage::Downloading { asked_us: now_us },
            directive,
        };
        let mut out = vec![update.report(UpdatePhase::Received, None)];
        if update.directive.action == Action::Revert {
            update.stage = Stage::Done;
            out.push(update.report(UpdatePhase::Committed, Some("reverted by directive")));
            out.push(Out::Serving(update.directive.release.0));
            return (update, out);
        }
        out.extend(update.fetch_missing());
        (update, out)
    }

    /// The bundle it downloads.
    pub fn bundle_sha256(&self) -> &str {
        &self.directive.bundle.sha256
    }

    /// A chunk the server signed for this gateway: checked against the directive's digests.
    pub fn on_chunk(
        &mut self,
        chunk: &Chunk,
        data: &[u8],
        now_us: u64,
    ) -> Result<Vec<Out>, String> {
        let plan = &self.directive.bundle;
        if chunk.sha256 != plan.sha256 {
            return Err(format!("a chunk of bundle {} that no directive names", chunk.sha256));
        }
        let Some(digest) = plan.chunks.get(chunk.index as usize) else {
            return Err(format!("chunk {} of a {}-chunk bundle", chunk.index, plan.chunks.len()));
        };
        if &sha256_hex(data) != digest {
            return Err(format!("chunk {} does not match its digest", chunk.index));
        }
        if !self.missing.remove(&chunk.index) || !self.missing.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = vec![
            self.report(UpdatePhase::Downloaded, None),
            self.report(UpdatePhase::Verified, None),
        ];
        if self.fail {
            self.stage = Stage::Done;
            out.push(self.report(
                UpdatePhase::Rejected,
                Some("simulated failure: the self-test did not reproduce the golden cases"),
            ));
            return Ok(out);
        }
        out.push(self.report(UpdatePhase::SelfTested, None));
        let shadow = self.directive.activation.shadow_secs * 1_000_000;
        self.stage = Stage::Shadow { until_us: now_us + shadow };
        Ok(out)
    }

    /// What is due at `now_us`: chunks asked again, the end of shadow or probation.
    pub fn on_time(&mut self, now_us: u64) -> Vec<Out> {
        match self.stage {
            Stage::Downloading { asked_us } if now_us.saturating_sub(asked_us) >= REFETCH_US => {
                self.stage = Stage::Downloading { asked_us: now_us };
                self.fetch_missing()
            }
            Stage::Shadow { until_us } if now_us >= until_us => {
                let probation = self.directive.activation.probation_secs * 1_000_000;
                self.stage = Stage::Probation { until_us: now_us + probation };
                vec![
                    self.report(UpdatePhase::ShadowPassed, None),
                    self.report(UpdatePhase::Activated, None),
                    Out::Serving(self.directive.release.0),
                ]
            }
            Stage::Probation { until_us } if now_us >= until_us => {
                self.stage = Stage::Done;
                vec![self.report(UpdatePhase::Committed, None)]
            }
            _ => Vec::new(),
        }
    }

    fn fetch_missing(&self) -> Vec<Out> {
        let mut out: Vec<Out> = Vec::new();
        for &index in &self.missing {
            match out.last_mut() {
                Some(Out::Fetch { first, count })
                    if *first + *count == index && *count < CHUNKS_PER_REQUEST =>
                {
                    *count += 1
                }
                _ => out.push(Out::Fetch { first: index, count: 1 }),
            }
        }
        out
    }

    fn report(&self, phase: UpdatePhase, reason: Option<&str>) -> Out {
        Out::Report(Box::new(UpdateReport {
            rollout: Some(self.directive.rollout.clone()),
            directive: Some(self.directive.seq),
            model: Some(self.directive.model.clone()),
            release: Some(self.directive.release),
            phase,
            reason: reason.map(str::to_owned),
            health: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use millwright_shared::directive::{Activation, BundleRef, DIRECTIVE_VERSION};
    use millwright_shared::gates::Gates;
    use millwright_shared::{DeviceId, ModelName, Release};

    fn directive(action: Action, data: &[u8], chunk: usize) -> Directive {
        let now = time::OffsetDateTime::UNIX_EPOCH;
        Directive {
            v: DIRECTIVE_VERSION,
            device: DeviceId::new("sim-00001").unwrap(),
            seq: 7,
            issued_at: now,
            expires_at: now + time::Duration::hours(1),
            rollout: "r1".into(),
            action,
            model: ModelName::new("m").unwrap(),
            release: Release(2),
            bundle: BundleRef {
                sha256: sha256_hex(data),
                size: data.len() as u64,
                chunk_size: chunk as u32,
                chunks: data.chunks(chunk).map(sha256_hex).collect(),
            },
            activation: Activation { shadow_secs: 2, probation_secs: 3, gates: Gates::default() },
        }
    }

    fn phases(out: &[Out]) -> Vec<UpdatePhase> {
        out.iter()
            .filter_map(|o| match o {
                Out::Report(r) => Some(r.phase),
                _ => None,
            })
            .collect()
    }

    fn chunk(d: &Directive, index: u32) -> Chunk {
        Chunk { v: 1, sha256: d.bundle.sha256.clone(), index, data: String::new() }
    }

    #[test]
    fn an_install_downloads_every_chunk_then_waits_out_shadow_and_probation() {
        let data: Vec<u8> = (0..40u8).collect();
        let d = directive(Action::Install, &data, 2);
        let (mut u, out) = Update::start(d.clone(), false, 0);
        assert_eq!(phases(&out), [UpdatePhase::Received]);
        let asks: Vec<&Out> = out.iter().filter(|o| matches!(o, Out::Fetch { .. })).collect();
        assert_eq!(
            asks,
            [&Out::Fetch { first: 0, count: 16 }, &Out::Fetch { first: 16, count: 4 }],
            "20 chunks in requests of at most 16"
        );
        assert!(u.on_chunk(&chunk(&d, 3), &data[0..2], 1).is_err(), "wrong digest");
        assert!(u.on_chunk(&chunk(&d, 20), &data[0..2], 1).is_err(), "beyond the plan");
        for i in (0..20).filter(|&i| i != 5) {
            let got = u.on_chunk(&chunk(&d, i), &data[2 * i as usize..2 * i as usize + 2], 1);
            assert_eq!(got, Ok(Vec::new()));
        }
        assert_eq!(u.on_time(9_999_999), Vec::new());
        assert_eq!(u.on_time(10_000_001), vec![Out::Fetch { first: 5, count: 1 }], "asked again");
        let done = u.on_chunk(&chunk(&d, 5), &data[10..12], 11_000_000).unwrap();
        assert_eq!(
            phases(&done),
            [UpdatePhase::Downloaded, UpdatePhase::Verified, UpdatePhase::SelfTested]
        );
        assert_eq!(u.on_time(12_999_999), Vec::new(), "shadow: 2 s");
        let swapped = u.on_time(13_000_000);
        assert_eq!(phases(&swapped), [UpdatePhase::ShadowPassed, UpdatePhase::Activated]);
        assert!(swapped.contains(&Out::Serving(2)));
        assert_eq!(u.on_time(15_999_999), Vec::new(), "probation: 3 s");
        assert_eq!(phases(&u.on_time(16_000_000)), [UpdatePhase::Committed]);
        assert_eq!(u.on_time(99_000_000), Vec::new());
        match &done[0] {
            Out::Report(r) => {
                assert_eq!((r.directive, r.rollout.as_deref()), (Some(7), Some("r1")))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failing_gateway_is_rejected_after_verification_and_a_revert_is_immediate() {
        let data = [1u8; 8];
        let d = directive(Action::Install, &data, 8);
        let (mut u, _) = Update::start(d.clone(), true, 0);
        let out = u.on_chunk(&chunk(&d, 0), &data, 1).unwrap();
        assert_eq!(
            phases(&out),
            [UpdatePhase::Downloaded, UpdatePhase::Verified, UpdatePhase::Rejected]
        );
        assert_eq!(u.on_time(60_000_000), Vec::new());
        let (_, out) = Update::start(directive(Action::Revert, &data, 8), false, 0);
        assert_eq!(phases(&out), [UpdatePhase::Received, UpdatePhase::Committed]);
        assert!(out.contains(&Out::Serving(2)));
    }
}
