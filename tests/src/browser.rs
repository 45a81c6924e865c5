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
        // The pages are served over HTTPS with the test's own CA, which Chromium does not know;
        // the certificate chain is checked by the rustls clients of the other tests.
        .arg("--ignore-certificate-errors")
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

/// A headless Chromium driven over the DevTools protocol, for pages that must be clicked:
/// every tab records its console messages, uncaught exceptions and log entries (failed
/// requests included).
pub struct Browser {
    browser: headless_chrome::Browser,
}

/// One tab, with everything its pages said on the console.
pub struct Tab {
    tab: std::sync::Arc<headless_chrome::Tab>,
    console: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Browser {
    pub fn launch(width: u32, height: u32) -> anyhow::Result<Browser> {
        let options = headless_chrome::LaunchOptions::default_builder()
            .path(Some(exe()?))
            .headless(true)
            .sandbox(false)
            .window_size(Some((width, height)))
            .idle_browser_timeout(Duration::from_secs(120))
            .args(vec![
                std::ffi::OsStr::new("--disable-gpu"),
                std::ffi::OsStr::new("--disable-dev-shm-usage"),
                std::ffi::OsStr::new("--no-first-run"),
                // HTTPS with the test's own CA (see `run`).
                std::ffi::OsStr::new("--ignore-certificate-errors"),
            ])
            .build()
            .map_err(|e| anyhow::anyhow!("chromium options: {e}"))?;
        Ok(Browser { browser: headless_chrome::Browser::new(options)? })
    }

    pub fn tab(&self) -> anyhow::Result<Tab> {
        use headless_chrome::protocol::cdp::types::Event;
        let tab = self.browser.new_tab()?;
        tab.set_default_timeout(Duration::from_secs(20));
        let console = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = console.clone();
        tab.add_event_listener(std::sync::Arc::new(move |event: &Event| {
            let line = match event {
                Event::RuntimeConsoleAPICalled(e) => {
                    let args: Vec<String> = e
                        .params
                        .args
                        .iter()
                        .map(|a| {
                            a.value
                                .as_ref()
                                .map(ToString::to_string)
                                .or_else(|| a.description.clone())
                                .unwrap_or_default()
                        })
                        .collect();
                    Some(format!("console.{:?}: {}", e.params.Type, args.join(" ")))
                }
                Event::RuntimeExceptionThrown(e) => {
                    let d = &e.params.exception_details;
                    let what = d.exception.as_ref().and_then(|x| x.description.clone());
                    Some(format!("uncaught: {} {}", d.text, what.unwrap_or_default()))
                }
                Event::LogEntryAdded(e) => Some(format!(
                    "log {:?}: {} {}",
                    e.params.entry.level,
                    e.params.entry.text,
                    e.params.entry.url.clone().unwrap_or_default()
                )),
                _ => None,
            };
            if let Some(line) = line
                && let Ok(mut lines) = sink.lock()
            {
                lines.push(line);
            }
        }))?;
        tab.enable_runtime()?;
        tab.enable_log()?;
        Ok(Tab { tab, console })
    }
}

impl Tab {
    /// Opens `url` and waits for its load event.
    pub fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.tab.navigate_to(url)?.wait_until_navigated()?;
        Ok(())
    }

    /// Evaluates the expression `js` in the page (awaiting a promise) and returns its value
    /// as JSON (`null` for `undefined`).
    pub fn eval(&self, js: &str) -> anyhow::Result<serde_json::Value> {
        let wrapped = format!("(async () => JSON.stringify(await ({js})))()");
        let result = self.tab.evaluate(&wrapped, true)?;
        match result.value {
            Some(serde_json::Value::String(json)) => Ok(serde_json::from_str(&json)?),
            _ => Ok(serde_json::Value::Null),
        }
    }

    /// Presses a key (e.g. `Enter`) in the focused element.
    pub fn press_key(&self, key: &str) -> anyhow::Result<()> {
        self.tab.press_key(key)?;
        Ok(())
    }

    /// Waits until `js` evaluates to `true`.
    pub fn wait_for(&self, js: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.eval(js)? == serde_json::Value::Bool(true) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "waited {timeout:?} for `{js}`; the page shows:\n{}\nconsole: {:#?}",
                    self.text("body").unwrap_or_default(),
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The text of the first element matching `selector`.
    pub fn text(&self, selector: &str) -> anyhow::Result<String> {
        let js = format!(
            "(() => {{ const e = document.querySelector({}); return e ? e.innerText : null; }})()",
            serde_json::to_string(selector)?
        );
        match self.eval(&js)? {
            serde_json::Value::String(s) => Ok(s),
            _ => bail!("no element {selector}"),
        }
    }

    /// Clicks the element matching `selector` as a user would (mouse events at its centre),
    /// once it exists and is not disabled.
    /// Pages that redraw themselves may replace the element between finding it and reading
    /// its box (Chromium then answers "detached", "no node with given id", "could not compute
    /// box model", depending on the moment); then it is found again, up to 20 times.
    pub fn click(&self, selector: &str) -> anyhow::Result<()> {
        let enabled = format!(
            "(() => {{ const e = document.querySelector({}); return !!e && !e.disabled; }})()",
            serde_json::to_string(selector)?
        );
        self.wait_for(&enabled, Duration::from_secs(20))?;
        let mut attempts = 0;
        loop {
            let result = self.tab.wait_for_element(selector).and_then(|e| e.click().map(|_| ()));
            match result {
                Ok(()) => return Ok(()),
                Err(e) if attempts >= 20 => {
                    return Err(e.context(format!("clicking {selector} ({attempts} attempts)")));
                }
                Err(_) => attempts += 1,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Clicks the element matching `selector` and types `text` into it.
    pub fn type_into(&self, selector: &str, text: &str) -> anyhow::Result<()> {
        self.click(selector)?;
        self.tab.type_str(text)?;
        Ok(())
    }

    /// Saves a PNG of the whole page (beyond the window) to `path`.
    pub fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let png =
            self.tab.capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)?;
        std::fs::write(path, png)?;
        Ok(())
    }

    /// Everything the tab's pages logged so far.
    pub fn console(&self) -> Vec<String> {
        self.console.lock().map(|c| c.clone()).unwrap_or_default()
    }
}
