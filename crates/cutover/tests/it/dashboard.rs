//! The dashboard in a real browser: headless Chromium driven over WebDriver (chromedriver),
//! against a real daemon with a rollout in progress. `.ci/run` installs Debian's `chromium` and
//! `chromium-driver`; outside CI a machine without them skips this test with a note.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

use crate::harness::{Daemon, free_port};

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn start_chromedriver() -> (Driver, u16) {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Driver(child), port)
}

async fn browser(port: u16, profile: &std::path::Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1200,1400",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a WebDriver session")
}

/// Waits until the element's text satisfies `f`; the page updates itself over SSE.
async fn wait_text(c: &Client, css: &str, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await
            && let Ok(t) = e.text().await
            && f(&t)
        {
            return t;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_login_and_abort_in_chromium() {
    if !(have("chromedriver") && std::path::Path::new("/usr/bin/chromium").exists()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install chromium and chromium-driver (.ci/run does)"
        );
        eprintln!(
            "note: skipping the browser test: chromium/chromedriver are not installed here (.ci/run installs them)"
        );
        return;
    }
    let d = tokio::task::spawn_blocking(|| {
        let d = Daemon::start(r#"[ { weight = 20, pause = "1h" }, { weight = 100 } ]"#);
        assert!(d.cli(&["deploy", "web", "v2"]).status.success());
        d.wait_for("v2 at 20%", |s| s["weights"]["v2"] == 20);
        d
    })
    .await
    .unwrap();
    let (_driver, port) = start_chromedriver();
    let profile = tempfile::tempdir().unwrap();
    let c = browser(port, profile.path()).await;
    let base = format!("http://{}", d.api);

    // Unauthenticated visitors land on the login form; a wrong token is refused.
    c.goto(&format!("{base}/")).await.unwrap();
    assert!(c.current_url().await.unwrap().as_str().ends_with("/login"));
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys("wrong")
        .await
        .unwrap();
    c.find(Locator::Id("login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&c, "[role=alert]", "the wrong-token message", |t| {
        t.contains("not right")
    })
    .await;

    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(&d.token())
        .await
        .unwrap();
    c.find(Locator::Id("login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(
        &c,
        "section[data-service=web] h2",
        "the service on the overview",
        |t| t.contains("progressing"),
    )
    .await;
    // The overview shows each service's phase and weights, not only its name.
    wait_text(
        &c,
        "section[data-service=web] .phase",
        "the phase on the overview",
        |t| t == "progressing",
    )
    .await;
    for (version, weight) in [("v1", "80%"), ("v2", "20%")] {
        wait_text(
            &c,
            &format!("section[data-service=web] i.weight[data-version={version}]"),
            "a weight on the overview",
            |t| t == weight,
        )
        .await;
    }
    wait_text(
        &c,
        "section[data-service=web] p",
        "the step on the overview",
        |t| t.contains("rollout #1 to v2") && t.contains("step 1/2"),
    )
    .await;

    c.goto(&format!("{base}/services/web")).await.unwrap();
    wait_text(&c, "#phase", "the rollout in progress", |t| {
        t == "progressing"
    })
    .await;
    let weight = wait_text(&c, "i.weight[data-version=v2]", "v2's weight", |t| {
        t == "20%"
    })
    .await;
    assert_eq!(weight, "20%");
    let charts = c.find_all(Locator::Css("svg[role=img]")).await.unwrap();
    assert_eq!(charts.len(), 3, "request rate, error rate and p99 charts");
    // Each chart has a labelled time axis: "now" at the right, and earlier ticks before it
    // (the panel re-renders every 2 s, so the history grows until there are some).
    let deadline = Instant::now() + Duration::from_secs(30);
    let labels = loop {
        let mut labels = Vec::new();
        for t in c
            .find_all(Locator::Css("svg[role=img] text.tick"))
            .await
            .unwrap()
        {
            if let (Ok(text), Ok(Some(at))) = (t.text().await, t.attr("data-at").await) {
                labels.push((text, at));
            }
        }
        if labels.iter().filter(|(l, _)| l.starts_with('-')).count() >= 3 {
            break labels;
        }
        assert!(
            Instant::now() < deadline,
            "no time axis on the charts: {labels:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        labels.iter().filter(|(l, _)| l == "now").count(),
        3,
        "one \"now\" per chart: {labels:?}"
    );
    for (label, at) in &labels {
        assert!(
            label == "now" || label.trim_start_matches('-').ends_with(['s', 'm']),
            "{label:?}"
        );
        assert!(at.parse::<jiff::Timestamp>().is_ok(), "{at:?}");
    }

    c.find(Locator::Css("button[data-action=abort]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.accept_alert().await.unwrap();
    wait_text(&c, "#phase", "the rollout to end", |t| t == "stable").await;
    // The button's action is recorded as the dashboard's.
    wait_text(&c, "#events", "the aborted event", |t| {
        t.contains("aborted by user (by dashboard)")
    })
    .await;

    let png = c.screenshot().await.unwrap();
    // The test binary is target/<profile>/deps/it-*; the screenshot goes to target/.
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap();
    std::fs::write(target.join("dashboard.png"), png).unwrap();
    c.close().await.unwrap();

    let h = tokio::task::spawn_blocking(move || {
        let h: serde_json::Value =
            serde_json::from_slice(&d.cli(&["history", "--json"]).stdout).unwrap();
        h
    })
    .await
    .unwrap();
    assert_eq!(h["rollouts"][0]["outcome"], "aborted");
    assert_eq!(h["rollouts"][0]["ended_by"], "dashboard");
    assert!(
        h["rollouts"][0]["started_by"]
            .as_str()
            .is_some_and(|s| s.contains('@')),
        "the CLI's user@host: {h}"
    );
}
