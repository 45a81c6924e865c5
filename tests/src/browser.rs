//! Headless Chromium (Debian's `chromium` package) driven through its command line: the DOM
//! after scripts ran (`--dump-dom`), screenshots, and the console messages the page produced,
//! read from Chromium's own log (`--enable-logging=stderr`, one `:CONSOLE` line per message,
//! errors and uncaught exceptions included).

use anyhow::{Context as _, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long scripts may run (in the page's virtual time) before the DOM is taken.
const VIRTUAL_TIME_MS: u32 = 3000;

/// One headless load of a page.
#[derive(Debug)]
pub struct Load {
    /// The DOM after the page's scripts ran (empty for a screenshot).
    pub dom: String,
    /// Every console message the page logged (errors, warnings, uncaught exceptions).
    pub console: Vec<String>,
    /// Wall time of the whole headless run, browser start included.
    pub wall: Duration,
}

pub fn exe() -> anyhow::Result<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("chromium is not installed (apt-get install chromium); .ci/run installs it")
}

fn run(url: &str, extra: &[String]) -> anyhow::Result<Load> {
    let profile = tempfile::tempdir()?;
    let started = Instant::now();
    let output = Command::new(exe()?)
        .args(["--headless", "--disable-gpu", "--no-sandbox", "--no-first-run"])
        .args(["--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={VIRTUAL_TIME_MS}"))
        .args(extra)
        .arg(url)
        .output()
        .context("cannot run chromium")?;
    let wall = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("chromium failed on {url} ({}):\n{stderr}", output.status);
    }
    let console = stderr.lines().filter(|l| l.contains(":CONSOLE")).map(str::to_owned).collect();
    Ok(Load { dom: String::from_utf8_lossy(&output.stdout).into_owned(), console, wall })
}

/// Loads `url` and returns its rendered DOM.
pub fn dump_dom(url: &str) -> anyhow::Result<Load> {
    run(url, &["--dump-dom".to_owned()])
}

/// Saves a PNG of `url` rendered at `width`×`height` CSS pixels.
pub fn screenshot(url: &str, path: &Path, width: u32, height: u32) -> anyhow::Result<Load> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let load = run(
        url,
        &[
            format!("--screenshot={}", path.display()),
            format!("--window-size={width},{height}"),
            "--hide-scrollbars".to_owned(),
        ],
    )?;
    if !std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
        bail!("chromium wrote no screenshot to {}", path.display());
    }
    Ok(load)
}

/// Where the browser tests save their screenshots: `target/screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    crate::repo_root().join("target/screenshots")
}
