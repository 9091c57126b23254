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

/// Serves `html` to every request on a free port of 127.0.0.1: another app of the same host,
/// so same-site with the dashboard (a site ignores the port) though not same-origin.
fn serve_page(html: String) -> SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{html}",
                html.len()
            );
        }
    });
    addr
}

/// The attacks of the issue, from a page on another port: a `fetch` in no-cors mode (pause,
/// promote), a urlencoded form (abort) and a `text/plain` form whose body reads as JSON
/// (deploy with an attacker's env). The title turns `attacked` once every one has answered.
fn attack_page(api: SocketAddr) -> String {
    let base = format!("http://{api}/api/v1/services/web");
    format!(
        r#"<!doctype html><html><head><title>waiting</title></head><body>
<iframe name=sink1></iframe><iframe name=sink2></iframe>
<form id=abort method=post action="{base}/abort" target=sink1><input name=x value=1></form>
<form id=deploy method=post enctype=text/plain action="{base}/deploy" target=sink2><input name='{{"version":"v9","env":{{"INJECTED_BY_CSRF":"1"}},"pad":"' value='"}}'></form>
<script>
const post = (action, body) => fetch(`{base}/${{action}}`, {{method: 'POST', mode: 'no-cors', credentials: 'include', body}}).catch(() => null);
const submit = (id, sink) => new Promise((done) => {{
  document.querySelector(`iframe[name=${{sink}}]`).addEventListener('load', done, {{once: true}});
  document.getElementById(id).submit();
}});
(async () => {{
  await post('pause', '{{}}');
  await post('promote', '{{"full":true}}');
  await submit('abort', 'sink1');
  await submit('deploy', 'sink2');
  document.title = 'attacked';
}})();
</script></body></html>"#
    )
}

async fn log_in(c: &Client, base: &str, token: &str) {
    c.goto(&format!("{base}/login")).await.unwrap();
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    c.find(Locator::Id("login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(c, "section[data-service=web] h2", "the overview", |t| {
        t.contains("web")
    })
    .await;
}

/// A raw request with a cookie, as a script outside the browser would replay a stolen one.
fn with_cookie(api: SocketAddr, method: &str, path: &str, cookie: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(api).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\nCookie: {cookie}\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_origin_pages_cannot_act_but_the_dashboard_can() {
    // This test is the proof of a security property: it never skips, it fails.
    assert!(
        have("chromedriver") && std::path::Path::new("/usr/bin/chromium").exists(),
        "the CSRF test needs chromium and chromium-driver (`apt-get install chromium chromium-driver`; .ci/run installs them)"
    );
    let d = tokio::task::spawn_blocking(|| {
        // Health checks that a busy machine (a browser beside the suite) cannot fail by
        // accident: only another page may change this rollout, and then the test says so.
        let d = Daemon::start_edited(|t| {
            t.replace(
                "STEPS",
                r#"[ { weight = 20, pause = "1h" }, { weight = 100 } ]"#,
            )
            .replace("unhealthy_threshold = 2", "unhealthy_threshold = 100")
        });
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
    let token = d.token();
    log_in(&c, &base, &token).await;

    let attacker = serve_page(attack_page(d.api));
    c.goto(&format!("http://{attacker}/")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.title().await.unwrap() != "attacked" {
        assert!(Instant::now() < deadline, "the attack page did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (d, s, h) = tokio::task::spawn_blocking(move || {
        let h: serde_json::Value =
            serde_json::from_slice(&d.cli(&["history", "--json"]).stdout).unwrap();
        let s = d.status();
        (d, s, h)
    })
    .await
    .unwrap();
    assert_eq!(
        s["phase"], "progressing",
        "paused or ended by another page: {s:#}"
    );
    assert_eq!(s["weights"]["v2"], 20, "promoted by another page: {s:#}");
    assert_eq!(s["candidate"], "v2", "{s:#}");
    let rollouts = h["rollouts"].as_array().unwrap();
    assert_eq!(rollouts.len(), 1, "another page deployed: {h:#}");
    assert!(!h.to_string().contains("INJECTED_BY_CSRF"), "{h:#}");

    // The session cookie is a random id, never the API token.
    let cookies = c.get_all_cookies().await.unwrap();
    let session = cookies
        .iter()
        .find(|k| k.name() == "cutover_session")
        .unwrap_or_else(|| panic!("no session cookie: {cookies:?}"));
    assert_ne!(session.value(), token, "the cookie must not be the token");
    assert!(
        cookies.iter().all(|k| !k.value().contains(&token)),
        "{cookies:?}"
    );
    let cookie = format!("cutover_session={}", session.value());

    // The dashboard's own buttons still work.
    c.goto(&format!("{base}/services/web")).await.unwrap();
    wait_text(&c, "#phase", "the rollout", |t| t == "progressing").await;
    c.find(Locator::Css("button[data-action=pause]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.accept_alert().await.unwrap();
    wait_text(&c, "#phase", "the pause", |t| t == "paused").await;

    // Logging out ends the session on the server: the cookie replayed is refused.
    assert_eq!(
        with_cookie(d.api, "GET", "/api/v1/status", &cookie),
        200,
        "a live session reads"
    );
    c.find(Locator::Css("form[action='/logout'] button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.current_url().await.unwrap().as_str().ends_with("/login") {
        assert!(
            Instant::now() < deadline,
            "logout did not land on the login form"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        with_cookie(d.api, "GET", "/api/v1/status", &cookie),
        401,
        "a logged-out session is dead"
    );
    c.close().await.unwrap();
}

/// A raw request: `(status, whole answer)`.
fn raw(api: SocketAddr, head: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(api).unwrap();
    write!(
        s,
        "{head}\r\nHost: {api}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    (
        out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0),
        out,
    )
}

#[test]
fn api_bodies_must_be_json_and_the_token_is_not_a_cookie() {
    let d = Daemon::start(r#"[ { weight = 20, pause = "1h" }, { weight = 100 } ]"#);
    let token = d.token();
    let deploy = "POST /api/v1/services/web/deploy HTTP/1.1";
    let body = r#"{"version":"v2","env":{"INJECTED":"1"}}"#;
    // A body that does not say it is JSON is not read as JSON, even with the right token.
    let (code, text) = raw(
        d.api,
        &format!("{deploy}\r\nAuthorization: Bearer {token}\r\nContent-Type: text/plain"),
        body,
    );
    assert_eq!(code, 415, "{text}");
    assert!(text.contains("application/json"), "{text}");
    // The token in a cookie (what the dashboard used to set) opens nothing.
    let (code, _) = raw(
        d.api,
        &format!("{deploy}\r\nCookie: cutover_token={token}\r\nContent-Type: application/json"),
        body,
    );
    assert_eq!(code, 401);
    // A session cookie without the dashboard's origin and CSRF token cannot act either.
    let (code, text) = raw(
        d.api,
        "POST /login HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded",
        &format!("token={token}"),
    );
    assert_eq!(code, 303, "{text}");
    let session = text
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: cutover_session="))
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("no session cookie: {text}"))
        .to_owned();
    assert!(!text.contains(&token), "{text}");
    let (code, text) = raw(
        d.api,
        &format!(
            "{deploy}\r\nCookie: cutover_session={session}\r\nContent-Type: application/json\r\nOrigin: http://{}",
            d.api
        ),
        body,
    );
    assert_eq!(code, 403, "no CSRF token: {text}");
    // Frames of other origins are refused on every page.
    assert!(
        text.to_ascii_lowercase().contains("x-frame-options: deny"),
        "{text}"
    );
    // With a bearer token and JSON, the same deploy works (the CLI's way).
    let (code, text) = raw(
        d.api,
        &format!("{deploy}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json"),
        body,
    );
    assert_eq!(code, 201, "{text}");
}
