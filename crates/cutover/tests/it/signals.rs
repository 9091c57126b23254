//! Signals end to end (CONTRACT §10): a real daemon whose count bucket is shortened to 500 ms
//! (`CUTOVER_SIGNALS_BUCKET`, so an SLO "hour" is 30 seconds), real local receivers (HTTP
//! listeners for the webhook and PagerDuty, Python's aiosmtpd with STARTTLS for email),
//! `promtool` on the exported rules and the live exposition, and DORA over a scripted history.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Daemon, Load, free_port, healthy, http, stderr, stdout};

/// A local HTTP receiver: records every POST (path and JSON body) and answers 200.
struct Sink {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<(Instant, String, Value)>>>,
}

impl Sink {
    fn start() -> Sink {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let g = g.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(s);
                    let mut line = String::new();
                    if r.read_line(&mut line).is_err() {
                        return;
                    }
                    let path = line.split(' ').nth(1).unwrap_or("").to_owned();
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    g.lock().unwrap().push((Instant::now(), path, v));
                    let _ = r.get_mut().write_all(
                        b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 20\r\nConnection: close\r\n\r\n{\"status\":\"success\"}",
                    );
                });
            }
        });
        Sink { addr, got }
    }

    /// Waits for a body `f` accepts (a readiness signal; the limit only stops a hang).
    fn wait(&self, what: &str, d: &Daemon, f: impl Fn(&Value) -> bool) -> (Instant, Value) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some((t, _, v)) = self.got.lock().unwrap().iter().find(|(_, _, v)| f(v)) {
                return (*t, v.clone());
            }
            assert!(
                Instant::now() < deadline,
                "{what} never arrived; got {:#?}\n{}",
                self.got.lock().unwrap(),
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A CA and a certificate for 127.0.0.1 signed by it, made with `openssl`.
fn certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is needed to make the SMTP test's certificate (.ci/run installs it)");
        assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=cutover test CA",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "key.pem",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ]);
}

const SMTP: &str = r#"
import json, ssl, sys, threading
from aiosmtpd.controller import Controller

port, cert, key, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

class Handler:
    async def handle_DATA(self, server, session, envelope):
        with open(out, "a") as f:
            f.write(json.dumps({
                "from": envelope.mail_from,
                "to": envelope.rcpt_tos,
                "tls": session.ssl is not None,
                "data": envelope.content.decode("utf-8", "replace"),
            }) + "\n")
        return "250 OK"

ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
c = Controller(Handler(), hostname="127.0.0.1", port=port, tls_context=ctx, require_starttls=True)
c.start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// aiosmtpd on a free port, STARTTLS required; kills itself with the test.
struct Smtp {
    port: u16,
    child: Child,
    out: std::path::PathBuf,
}

impl Smtp {
    fn start(dir: &std::path::Path) -> Smtp {
        certificates(dir);
        std::fs::write(dir.join("smtp.py"), SMTP).unwrap();
        let port = free_port();
        let out = dir.join("mail.jsonl");
        let mut child = Command::new("python3")
            .arg(dir.join("smtp.py"))
            .arg(port.to_string())
            .arg(dir.join("cert.pem"))
            .arg(dir.join("key.pem"))
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 is needed for the SMTP listener");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "ready" {
            let mut e = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut e);
            panic!(
                "the SMTP listener did not start (is aiosmtpd installed? .ci/run installs it with pip): {e}"
            );
        }
        Smtp { port, child, out }
    }

    fn mails(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(d: &Daemon, args: &[&str]) -> Value {
    let out = d.cli(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn is_page(v: &Value, status: &str) -> bool {
    v["version"] == "4"
        && v["status"] == status
        && v["alerts"].as_array().is_some_and(|a| {
            a.iter().any(|a| {
                a["labels"]["severity"] == "page"
                    && a["labels"]["alertname"] == "ErrorBudgetBurn"
                    && a["status"] == status
            })
        })
}

/// A daemon with analysis off (a bad version goes straight to 100%), a 99.9% SLO, receivers
/// for pages and a receiver that cannot be reached.
fn signals_daemon(hook: &Sink, pd: &Sink, smtp: &Smtp, dead_port: u16) -> Daemon {
    let extra = format!(
        r#"
[[services.web.slo]]
name = "availability"
objective = 99.9

[alerts]
group_wait = "1s"
group_interval = "2s"

[[alerts.receivers]]
name = "hook"
kind = "webhook"
url = "http://{hook}/alertmanager"

[[alerts.receivers]]
name = "oncall"
kind = "pagerduty"
url = "http://{pd}/v2/enqueue"
routing_key_env = "SIGNALS_TEST_PD_KEY"

[[alerts.receivers]]
name = "mail"
kind = "email"
smtp = "127.0.0.1:{smtp}"
from = "cutover@example.com"
to = "oncall@example.com"
ca_file = "ca.pem"
send_resolved = true

[[alerts.receivers]]
name = "broken"
kind = "webhook"
url = "http://127.0.0.1:{dead_port}/nobody"

[[alerts.routes]]
matchers = ["severity=page"]
receiver = "hook"
continue = true

[[alerts.routes]]
matchers = ["severity=page"]
receiver = "oncall"
continue = true

[[alerts.routes]]
matchers = ["severity=page"]
receiver = "mail"
continue = true

[[alerts.routes]]
matchers = ["severity=page", "slo=availability"]
receiver = "broken"

[policy]
freeze_when_budget_exhausted = true
"#,
        hook = hook.addr,
        pd = pd.addr,
        smtp = smtp.port,
    );
    let mut d = Daemon::create(|t| {
        // Analysis off and one step at 100%: a bad version takes all traffic at once; the old
        // version stays warm so the rollback is an instant switch.
        // One instance per version: the proxy never ejects a version's last routable instance
        // for its 500s, so the bad version is not taken out by health before it is promoted.
        t.replace(
            "progress_deadline = \"20s\"\n",
            "progress_deadline = \"20s\"\nanalysis = false\n",
        )
        .replace("instances = 2\n", "instances = 1\n")
        .replace("scale_down_delay = \"1s\"", "scale_down_delay = \"5m\"")
        .replace("STEPS", "[ { weight = 100 } ]")
        .split("[services.web.analysis]")
        .next()
        .unwrap()
        .to_owned()
            + &extra
    });
    std::fs::copy(
        smtp.out.parent().unwrap().join("ca.pem"),
        d.dir.path().join("ca.pem"),
    )
    .unwrap();
    d.env = vec![
        ("CUTOVER_SIGNALS_BUCKET".into(), "500ms".into()),
        ("SIGNALS_TEST_PD_KEY".into(), "pd-routing-key-1234".into()),
    ];
    d.spawn();
    d.wait_for("v1 healthy", |s| healthy(s, "v1") >= 1);
    d
}

/// A bad version at 100% with analysis off burns the budget: the page reaches the webhook in
/// Alertmanager's v4 shape, PagerDuty as an Events v2 trigger and the mailbox over STARTTLS; a
/// receiver that cannot be reached shows as failing; deploys are refused while the budget is
/// exhausted (a forced one records its reason); the rollback is not frozen, and the page
/// resolves after it, on the webhook and as a PagerDuty resolve with the same dedup key.
#[test]
fn a_burning_budget_pages_real_receivers_freezes_deploys_and_resolves_after_rollback() {
    let mail_dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(mail_dir.path());
    let (hook, pd) = (Sink::start(), Sink::start());
    let dead = free_port();
    let d = signals_daemon(&hook, &pd, &smtp, dead);
    // About 100 requests a second: two keep-alive connections, a request every 20 ms each.
    let load = Load::start(d.web, 2, Duration::from_millis(20));
    load.wait_answers(300);
    let slo = json(&d, &["slo", "web", "--json"]);
    assert_eq!(slo["slos"][0]["exhausted"], false, "{slo:#}");

    let failing_from = Instant::now();
    let out = d.cli(&["deploy", "web", "v2", "--env", "DEMO_ERROR_RATE=1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_for("v2 promoted", |s| {
        s["stable"] == "v2" && s["phase"] == "stable"
    });

    // The page, to each receiver in its own format.
    let (paged_at, v) = hook.wait("a firing page on the webhook", &d, |v| is_page(v, "firing"));
    assert_eq!(v["receiver"], "hook");
    assert_eq!(v["groupLabels"]["alertname"], "ErrorBudgetBurn");
    assert_eq!(v["groupLabels"]["service"], "web");
    assert_eq!(v["truncatedAlerts"], 0);
    assert!(
        v["groupKey"]
            .as_str()
            .unwrap()
            .contains("severity=\"page\"")
    );
    let alert = &v["alerts"][0];
    assert_eq!(alert["endsAt"], "0001-01-01T00:00:00Z");
    assert_eq!(alert["fingerprint"].as_str().unwrap().len(), 16);
    assert!(
        alert["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("> 14.4×"),
        "{alert:#}"
    );
    eprintln!(
        "page on the webhook {:.1}s after the bad version was deployed (bucket 500ms)",
        paged_at.duration_since(failing_from).as_secs_f64()
    );
    let (_, trigger) = pd.wait("a PagerDuty trigger", &d, |v| {
        v["event_action"] == "trigger"
    });
    assert_eq!(trigger["routing_key"], "pd-routing-key-1234");
    assert_eq!(trigger["payload"]["severity"], "critical");
    assert_eq!(trigger["payload"]["source"], "web");
    let dedup = trigger["dedup_key"].as_str().unwrap().to_owned();
    assert_eq!(dedup.len(), 64);
    let deadline = Instant::now() + Duration::from_secs(60);
    while smtp.mails().is_empty() {
        assert!(Instant::now() < deadline, "no mail arrived:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let mail = &smtp.mails()[0];
    assert_eq!(mail["tls"], true, "STARTTLS was used");
    assert_eq!(mail["to"][0], "oncall@example.com");
    let data = mail["data"].as_str().unwrap();
    assert!(
        data.contains("Subject: [FIRING:1] ErrorBudgetBurn web"),
        "{data}"
    );
    // The secret never reaches the log or the state.
    assert!(!d.log().contains("pd-routing-key-1234"));

    // A receiver that never answers is retried, then shown failing, with a metric.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let a = json(&d, &["alerts", "--json"]);
        let broken = a["receivers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "broken")
            .unwrap()
            .clone();
        if broken["failing"] == true {
            assert!(broken["last_error"].as_str().unwrap().contains("/nobody"));
            assert!(
                a["alerts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x["state"] == "firing" && x["severity"] == "page"),
                "{a:#}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "broken never failed: {a:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, metrics) = http(d.api, "GET", "/metrics", Some(&d.token()), "");
    assert_eq!(status, 200);
    for line in [
        "cutover_alert_receiver_failing{receiver=\"broken\"} 1",
        "cutover_slo_objective_ratio{service=\"web\",slo=\"availability\"} 0.999",
        "cutover_alerts{alertname=\"ErrorBudgetBurn\",severity=\"page\",state=\"firing\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line}:\n{metrics}"
        );
    }
    promtool(&["check", "metrics"], Some(&metrics));

    // The budget is spent: deploys are refused with the figures, forced ones need a reason.
    let slo = json(&d, &["slo", "web", "--json"]);
    assert_eq!(slo["slos"][0]["exhausted"], true, "{slo:#}");
    let out = d.cli(&["deploy", "web", "v3"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let why = stderr(&out);
    assert!(
        why.contains("error budget exhausted: web/availability (99.9% over 30d)")
            && why.contains("bad of")
            && why.contains("--force --reason"),
        "{why}"
    );
    let out = d.cli(&["deploy", "web", "v3", "--force"]);
    assert_eq!(out.status.code(), Some(2), "--force alone is a usage error");

    // The way back is never frozen.
    let out = d.cli(&["rollback", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_for("v1 back", |s| s["stable"] == "v1" && s["phase"] == "stable");
    let (_, resolved) = hook.wait("the resolved page on the webhook", &d, |v| {
        is_page(v, "resolved")
    });
    assert_ne!(resolved["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
    let (_, resolve) = pd.wait("a PagerDuty resolve", &d, |v| {
        v["event_action"] == "resolve"
    });
    assert_eq!(resolve["dedup_key"], dedup.as_str());

    // Still exhausted: a forced deploy goes through, and its reason is on the record.
    let out = d.cli(&[
        "deploy",
        "web",
        "v4",
        "--force",
        "--reason",
        "the fix for the 500s",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["id"]
        .as_i64()
        .unwrap();
    let events = crate::harness::rollout_events(&d, id);
    assert!(
        events.iter().any(|(k, m)| k == "deploy-forced"
            && m.contains("the fix for the 500s")
            && m.contains("error budget exhausted")),
        "{events:#?}"
    );
    // Every alert transition is an event of the service, in the state.
    let db = rusqlite::Connection::open(d.dir.path().join("state/state.db")).unwrap();
    let count = |kind: &str| -> i64 {
        db.query_row(
            "SELECT count(*) FROM events WHERE service = 'web' AND kind = ?1",
            [kind],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert!(count("alert-firing") >= 1 && count("alert-resolved") >= 1);
    assert!(count("alert-delivery-failed") >= 1);
    let firing: String = db
        .query_row(
            "SELECT message FROM events WHERE kind = 'alert-firing' AND message LIKE '%(page)%' ORDER BY id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        firing.starts_with(
            "alert ErrorBudgetBurn (page) firing: web/availability (99.9% over 30d): burn "
        ),
        "{firing}"
    );
    let tally = load.stop();
    assert!(tally.per_version.contains_key("v2"));
}

/// Runs promtool with `args` (and `stdin`); promtool is installed by `.ci/run`.
fn promtool(args: &[&str], stdin: Option<&str>) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is needed (Debian's `prometheus` package; .ci/run installs it)");
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        stdout(&out),
        stderr(&out)
    );
}

/// `cutover export prometheus-rules` (no daemon needed) passes `promtool check rules`, with
/// Sloth's names and the Workbook's factors.
#[test]
fn exported_prometheus_rules_pass_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cutover.toml");
    std::fs::write(
        &config,
        r#"
[services.web]
listen = "127.0.0.1:18080"
command = ["cutover", "demo-app", "--port", "{port}"]

[[services.web.slo]]
name = "availability"
objective = 99.9

[[services.web.slo]]
name = "latency"
objective = 99
window = "28d"
latency = "250ms"

[services.api]
listen = "127.0.0.1:18081"
command = ["cutover", "demo-app", "--port", "{port}"]

[[services.api.slo]]
name = "availability"
objective = 99.5

[[alerts.rules]]
name = "HighErrorRate"
service = "web"
when = "error_rate > 0.05"
for = "5m"
severity = "page"

[[alerts.rules]]
name = "SlowP99"
when = "p99 > 300ms"
for = "10m"

[[alerts.rules]]
name = "TooFewInstances"
when = "healthy_instances < 2"
"#,
    )
    .unwrap();
    for service in [None, Some("web")] {
        let mut cmd = Command::new(crate::harness::EXE);
        cmd.args(["-c", config.to_str().unwrap(), "export", "prometheus-rules"]);
        cmd.args(service);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        let file = dir.path().join("rules.yml");
        std::fs::write(&file, &text).unwrap();
        promtool(&["check", "rules", file.to_str().unwrap()], None);
        for want in [
            "slo:sli_error:ratio_rate5m",
            "slo:sli_error:ratio_rate30d",
            "sloth_service: \"web\"",
            "(14.4 * 0.001)",
            // 28 days: Sloth's factor for the same windows.
            "(13.44 * 0.01)",
            "le=\\\"0.25\\\"",
            "- alert: \"HighErrorRate\"",
        ] {
            assert!(text.contains(want), "missing {want} in:\n{text}");
        }
        assert_eq!(text.contains("sloth_service: \"api\""), service.is_none());
    }
}

/// DORA over a history whose times are known, computed by hand; then a real deploy with
/// `--commit-time` and `--fixes` through the CLI adds to it.
#[test]
fn dora_figures_match_a_hand_computed_history() {
    use cutover_core::{RolloutOutcome, StrategyKind, Timestamp};
    use cutover_store::signals::RolloutNote;
    use cutover_store::{NewRollout, Store};

    const H: u64 = 3_600_000;
    const D: u64 = 24 * H;
    let mut d = Daemon::create(|t| {
        t.replace("STEPS", "[ { weight = 100 } ]").replace(
        "progress_deadline = \"20s\"\n",
        "progress_deadline = \"20s\"\nanalysis = false\n",
    ).split("[services.web.analysis]").next().unwrap().to_owned()
        // Fixes count for a month here: #6 is fixed 17 days after it was promoted.
        + "\n[dora]\nfix_window = \"30d\"\n"
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let t0 = now - 20 * D;
    {
        let mut store = Store::open(&d.dir.path().join("state")).unwrap();
        // (from, to, kind, outcome, start, minutes to finish, commit hours before, fixes)
        type Step = (
            &'static str,
            &'static str,
            &'static str,
            RolloutOutcome,
            u64,
            u64,
            Option<u64>,
            Option<i64>,
        );
        let script: &[Step] = &[
            // #1 day 0: promoted after 10 min; committed 2 h before the start: lead 2h10m.
            (
                "v1",
                "v2",
                "deploy",
                RolloutOutcome::Promoted,
                t0,
                10,
                Some(2),
                None,
            ),
            // #2 day 1: promoted (lead 5h10m); #3 rolls it back, promoted 40 min after #2 was.
            (
                "v2",
                "v3",
                "deploy",
                RolloutOutcome::Promoted,
                t0 + D,
                10,
                Some(5),
                None,
            ),
            (
                "v3",
                "v2",
                "rollback",
                RolloutOutcome::Promoted,
                t0 + D + 49 * 60_000,
                1,
                None,
                None,
            ),
            // #4 day 2: a canary analysis rolled back.
            (
                "v2",
                "v4",
                "deploy",
                RolloutOutcome::RolledBack,
                t0 + 2 * D,
                3,
                Some(1),
                None,
            ),
            // #5 day 3: promoted (lead 1h10m); #6 day 3 + 6 h fixes it (lead 30h10m),
            // promoted 6 h after #5 was.
            (
                "v2",
                "v5",
                "deploy",
                RolloutOutcome::Promoted,
                t0 + 3 * D,
                10,
                Some(1),
                None,
            ),
            (
                "v5",
                "v6",
                "deploy",
                RolloutOutcome::Promoted,
                t0 + 3 * D + 6 * H,
                10,
                Some(30),
                Some(5),
            ),
            // #7 day 4: aborted.
            (
                "v6",
                "v7",
                "deploy",
                RolloutOutcome::Aborted,
                t0 + 4 * D,
                2,
                None,
                None,
            ),
        ];
        for (i, (from, to, kind, outcome, start, minutes, commit, fixes)) in
            script.iter().enumerate()
        {
            let id = store
                .insert_rollout(&NewRollout {
                    service: "web".into(),
                    from_version: (*from).into(),
                    to_version: (*to).into(),
                    strategy: StrategyKind::Canary,
                    env: Default::default(),
                    started_at: Timestamp(*start),
                    checkpoint: String::new(),
                    started_by: Some("script".into()),
                })
                .unwrap();
            assert_eq!(id, i as i64 + 1);
            let mut row = store.rollout(id).unwrap().unwrap();
            row.outcome = *outcome;
            row.finished_at = Some(Timestamp(start + minutes * 60_000));
            store.update_rollout(&row).unwrap();
            store
                .put_rollout_note(&RolloutNote {
                    rollout_id: id,
                    kind: (*kind).into(),
                    commit_sha: None,
                    commit_time: commit.map(|h| Timestamp(start - h * H)),
                    fixes: *fixes,
                    forced_reason: None,
                })
                .unwrap();
        }
        store
            .upsert_service(&cutover_store::ServiceRow {
                name: "web".into(),
                stable_version: "v1".into(),
                stable_env: Default::default(),
                previous_version: None,
                previous_env: Default::default(),
            })
            .unwrap();
    }
    d.spawn();
    d.wait_for("v1 healthy", |s| healthy(s, "v1") >= 2);

    let r = json(&d, &["dora", "web", "--since", "30d", "--json"]);
    // Deployments: #1, #2, #5, #6 (the rollback, the caught canary and the abort are not).
    assert_eq!(r["deployments"], 4, "{r:#}");
    assert!((r["deployments_per_day"].as_f64().unwrap() - 4.0 / 30.0).abs() < 1e-6);
    // Failed: #2 (rolled back by #3) and #5 (fixed by #6): 2 of 4 = 50%, low.
    assert_eq!(r["failed_deployments"], 2);
    assert_eq!(r["change_failure_rate"], 0.5);
    assert_eq!(r["change_failure_level"], "low");
    // Time to restore: 40 min (#3 promoted at day 1 + 50 min, #2 at day 1 + 10 min) and 6 h:
    // the median of two is their mean, 3h20m: high.
    assert_eq!(
        r["time_to_restore_seconds"],
        (40 * 60 + 6 * 3600) as f64 / 2.0
    );
    assert_eq!(r["time_to_restore_level"], "high");
    // Lead times 2h10m, 5h10m, 1h10m, 30h10m: median (2h10m + 5h10m) / 2 = 3h40m: elite.
    assert_eq!(r["deployments_with_commit"], 4);
    assert_eq!(r["lead_time_seconds"], (3 * 3600 + 40 * 60) as f64);
    assert_eq!(r["lead_time_level"], "elite");
    assert_eq!(
        (
            r["caught_by_analysis"].as_u64(),
            r["not_promoted"].as_u64(),
            r["rollbacks"].as_u64()
        ),
        (Some(1), Some(1), Some(1))
    );
    // Promotions on days 0, 1 and 3 of the last 30 (day 3 twice): most weeks have none, the
    // one 30-day month has 4: monthly, medium.
    assert_eq!(r["deployment_frequency"], "monthly");
    assert_eq!(r["deployment_frequency_level"], "medium");

    // A real deploy through the CLI: committed 3 h ago, fixing #6.
    let commit_time = jiff::Timestamp::from_millisecond((now - 3 * H) as i64)
        .unwrap()
        .to_string();
    let out = d.cli(&[
        "deploy",
        "web",
        "v8",
        "--commit",
        "abc123",
        "--commit-time",
        &commit_time,
        "--fixes",
        "6",
        "--wait",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = json(&d, &["dora", "web", "--json"]);
    assert_eq!(r["deployments"], 5, "{r:#}");
    assert_eq!(r["failed_deployments"], 3);
    let fixed = r["failures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["rollout_id"] == 6)
        .unwrap_or_else(|| panic!("#6 is not failed: {r:#}"));
    assert_eq!(fixed["how"], "fixed by #8");
    // #8's lead time is about 3 hours; the median of five (1h10m, 2h10m, ~3h, 5h10m, 30h10m)
    // is #8's own.
    let lead = r["lead_time_seconds"].as_f64().unwrap();
    assert!(
        (3.0 * 3600.0..3.0 * 3600.0 + 120.0).contains(&lead),
        "{lead}"
    );
    // The text form has the four keys and the buckets.
    let text = stdout(&d.cli(&["dora", "web"]));
    for want in [
        "deployment frequency",
        "lead time for changes",
        "change failure rate",
        "time to restore",
        "caught by canary analysis: 1",
    ] {
        assert!(text.contains(want), "{text}");
    }
}

/// An instance that keeps dying raises `InstanceCrashLooping`, labelled with the instance the
/// exits were of (the runtime says which; no message is parsed), and only that one.
#[test]
fn an_instance_that_keeps_dying_raises_instance_crash_looping() {
    let mut d = Daemon::create(|t| t.replace("STEPS", "[ { weight = 100 } ]"));
    d.env = vec![("CUTOVER_SIGNALS_BUCKET".into(), "500ms".into())];
    d.spawn();
    let s = d.wait_for("v1 healthy", |s| healthy(s, "v1") >= 2);
    let victim = s["instances"][0]["id"].as_str().unwrap().to_owned();
    for round in 0..3 {
        let s = d.wait_for("the victim healthy", |s| {
            s["instances"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["id"] == victim.as_str() && i["health"] == "healthy")
        });
        let inst = s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == victim.as_str())
            .unwrap()
            .clone();
        let pid = crate::harness::pid_of(&inst).unwrap();
        let killed = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success(), "round {round}");
        d.wait_for("the victim's exit seen", |s| {
            s["instances"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["id"] == victim.as_str() && i["runs_as"] != inst["runs_as"])
        });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = json(&d, &["alerts", "--json"]);
        let crash: Vec<&Value> = a["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["alertname"] == "InstanceCrashLooping")
            .collect();
        if let Some(x) = crash.iter().find(|x| x["state"] == "firing") {
            assert_eq!(x["labels"]["instance"], victim.as_str(), "{a:#}");
            assert_eq!(crash.len(), 1, "only the victim: {a:#}");
            break;
        }
        assert!(Instant::now() < deadline, "no InstanceCrashLooping: {a:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
