//! The download of a release: chunk requests over MQTT (a window at a time, again after a
//! timeout or a reconnect), each chunk checked against the directive's digests as it arrives and
//! written to the staging file, which resumes after a restart. A complete file goes on to
//! [`Agent::install_staged`].

use super::Agent;
use super::update::{Job, Stage, Update, failpoint};
use crate::clock;
use crate::staging::Staging;
use millwright_shared::directive::ChunkError;
use millwright_shared::signed::{self, Purpose};
use millwright_shared::topics;
use millwright_shared::wire::{self, Chunk, FetchRequest, WIRE_VERSION};
use rumqttc::QoS;
use std::collections::HashMap;

/// Chunks failing their checks before the download is refused.
const MAX_BAD_CHUNKS: u32 = 3;

impl Agent {
    /// Starts or resumes the download, or goes straight on when the bundle is already here.
    pub(super) fn fetch(&mut self, job: Job) {
        if self.bundle_path(&job.directive.bundle.sha256).exists() {
            return self.install_staged(job);
        }
        match Staging::open(&self.updates_dir(), &job.directive.bundle) {
            Ok(staging) if staging.complete() => self.finish_download(job, staging),
            Ok(staging) => {
                tracing::info!(
                    have = staging.received(),
                    of = staging.total(),
                    "downloading release {}",
                    job.directive.release.0
                );
                let stage = Stage::Fetching { staging, requested: HashMap::new(), bad_chunks: 0 };
                self.update = Some(Update { job, stage });
                self.request_chunks(clock::monotonic_ms());
            }
            Err(e) => self.reject(job, format!("cannot stage the download: {e}"), None),
        }
    }

    /// Asks for missing chunks, at most `fetch_window` at a time; unanswered requests are made
    /// again after `fetch_timeout`.
    pub(super) fn request_chunks(&mut self, now_ms: i64) {
        if !self.uplink.is_connected() {
            return;
        }
        let timeout_ms = self.config.updates.fetch_timeout.as_millis() as i64;
        let window = self.config.updates.fetch_window as usize;
        let topic = topics::fetch(&self.config.device);
        let Some(Update { job, stage: Stage::Fetching { staging, requested, .. } }) =
            &mut self.update
        else {
            return;
        };
        requested.retain(|_, at| now_ms - *at < timeout_ms);
        let room = window.saturating_sub(requested.len());
        let wanted: Vec<u32> = staging
            .missing(staging.total())
            .into_iter()
            .filter(|i| !requested.contains_key(i))
            .take(room)
            .collect();
        for index in wanted {
            let request = FetchRequest {
                v: WIRE_VERSION,
                sha256: job.directive.bundle.sha256.clone(),
                first: index,
                count: 1,
            };
            let body = wire::encode(&request);
            let payload =
                signed::seal(&self.config.identity.key, Purpose::Fetch, &self.config.device, &body);
            if self.client.try_publish(topic.clone(), QoS::AtLeastOnce, false, payload).is_err() {
                break;
            }
            requested.insert(index, now_ms);
        }
    }

    /// After a reconnect nothing requested before can be assumed to arrive.
    pub(super) fn on_reconnect_update(&mut self) {
        if let Some(Update { stage: Stage::Fetching { requested, .. }, .. }) = &mut self.update {
            requested.clear();
        }
        self.request_chunks(clock::monotonic_ms());
    }

    /// A chunk the server signed for this device (the signature is checked by the caller, so
    /// an unsigned chunk from another party never counts as a bad chunk of the download).
    pub(super) fn on_chunk(&mut self, bytes: &[u8]) {
        let Some(Update { job, stage: Stage::Fetching { staging, requested, bad_chunks } }) =
            &mut self.update
        else {
            return;
        };
        let accepted = Chunk::decode(bytes)
            .map_err(|e| format!("chunk message refused: {e}"))
            .and_then(|chunk| match job.directive.bundle.accept(&chunk) {
                Err(ChunkError::OtherBundle) => Ok(None),
                Err(e) => {
                    requested.remove(&chunk.index);
                    Err(e.to_string())
                }
                Ok(ok) => Ok(Some(ok)),
            });
        let failure = match accepted {
            Ok(Some((index, data))) if !staging.has(index) => {
                requested.remove(&index);
                match staging.write(index, &data) {
                    Ok(()) => {
                        self.counters.chunks_received += 1;
                        if staging.received() == 1 {
                            failpoint("downloading");
                        }
                        None
                    }
                    Err(e) => Some(format!("cannot write the download: {e}")),
                }
            }
            Ok(_) => None,
            Err(e) => {
                *bad_chunks += 1;
                self.counters.chunks_refused += 1;
                tracing::warn!(bad = *bad_chunks, "{e}");
                (*bad_chunks >= MAX_BAD_CHUNKS)
                    .then(|| format!("download refused after {bad_chunks} bad chunks: {e}"))
            }
        };
        let complete = staging.complete();
        if let Some(reason) = failure {
            if let Some(update) = self.update.take() {
                self.reject(update.job, reason, None);
            }
        } else if complete {
            if let Some(Update { job, stage: Stage::Fetching { staging, .. } }) = self.update.take()
            {
                self.finish_download(job, staging);
            }
        } else {
            self.request_chunks(clock::monotonic_ms());
        }
    }

    fn finish_download(&mut self, job: Job, staging: Staging) {
        let dest = self.bundle_path(&job.directive.bundle.sha256);
        match staging.finish(&dest) {
            Ok(_) => self.install_staged(job),
            Err(e) => self.reject(job, format!("cannot keep the download: {e}"), None),
        }
    }
}
