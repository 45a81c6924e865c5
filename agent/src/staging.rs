//! Where a bundle is downloaded to: `updates/<sha256>.part`, the full size from the start, each
//! chunk written at its offset and synced. A restart re-hashes the chunks already on disk, so a
//! download resumes where it stopped and a torn write is fetched again.

use millwright_shared::bundle::sha256_hex;
use millwright_shared::directive::BundleRef;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

pub struct Staging {
    path: PathBuf,
    plan: BundleRef,
    have: Vec<bool>,
    file: File,
}

impl Staging {
    pub fn path_for(dir: &Path, plan: &BundleRef) -> PathBuf {
        dir.join(format!("{}.part", plan.sha256))
    }

    /// Opens (or creates) the staging file for `plan` and finds the chunks already there.
    pub fn open(dir: &Path, plan: &BundleRef) -> std::io::Result<Staging> {
        std::fs::create_dir_all(dir)?;
        let path = Self::path_for(dir, plan);
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        let mut have = vec![false; plan.chunks.len()];
        if file.metadata()?.len() == plan.size {
            let mut buf = Vec::new();
            for (index, done) in have.iter_mut().enumerate() {
                let Some(len) = plan.chunk_len(index as u32) else { break };
                buf.resize(len as usize, 0);
                file.seek(SeekFrom::Start(index as u64 * u64::from(plan.chunk_size)))?;
                file.read_exact(&mut buf)?;
                *done = sha256_hex(&buf) == plan.chunks[index];
            }
        } else {
            file.set_len(plan.size)?;
        }
        Ok(Staging { path, plan: plan.clone(), have, file })
    }

    pub fn received(&self) -> usize {
        self.have.iter().filter(|h| **h).count()
    }

    pub fn total(&self) -> usize {
        self.have.len()
    }

    pub fn has(&self, index: u32) -> bool {
        self.have.get(index as usize).copied().unwrap_or(false)
    }

    /// The first `n` chunks still missing.
    pub fn missing(&self, n: usize) -> Vec<u32> {
        self.have.iter().enumerate().filter(|(_, h)| !**h).take(n).map(|(i, _)| i as u32).collect()
    }

    /// Writes a chunk that already passed its checks ([`BundleRef::accept`]).
    pub fn write(&mut self, index: u32, bytes: &[u8]) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(u64::from(index) * u64::from(self.plan.chunk_size)))?;
        self.file.write_all(bytes)?;
        self.file.sync_data()?;
        if let Some(h) = self.have.get_mut(index as usize) {
            *h = true;
        }
        Ok(())
    }

    pub fn complete(&self) -> bool {
        self.have.iter().all(|h| *h)
    }

    /// Moves the complete file to `dest` (synced) and returns its bytes.
    pub fn finish(self, dest: &Path) -> std::io::Result<Vec<u8>> {
        let bytes = std::fs::read(&self.path)?;
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::rename(&self.path, dest)?;
        if let Some(dir) = dest.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(bytes)
    }

    /// Removes a staging file (an abandoned or refused download).
    pub fn discard(dir: &Path, plan: &BundleRef) {
        let _ = std::fs::remove_file(Self::path_for(dir, plan));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_download_resumes_with_the_chunks_already_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..10u8).collect();
        let plan = BundleRef {
            sha256: sha256_hex(&bytes),
            size: 10,
            chunk_size: 4,
            chunks: bytes.chunks(4).map(sha256_hex).collect(),
        };
        {
            let mut s = Staging::open(dir.path(), &plan).unwrap();
            assert_eq!(s.missing(10), vec![0, 1, 2]);
            s.write(2, &bytes[8..]).unwrap();
            s.write(0, &bytes[..4]).unwrap();
        }
        let mut s = Staging::open(dir.path(), &plan).unwrap();
        assert_eq!((s.received(), s.missing(10)), (2, vec![1]));
        s.write(1, &bytes[4..8]).unwrap();
        assert!(s.complete());
        let dest = dir.path().join("models/b.mwb");
        assert_eq!(s.finish(&dest).unwrap(), bytes);
        assert!(dest.exists() && !Staging::path_for(dir.path(), &plan).exists());
    }
}
