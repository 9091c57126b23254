#!/usr/bin/env python3
"""Time from a service starting to fail to the page reaching a webhook, with production
settings: 1-minute buckets, Alertmanager's default group_wait (30s), a 99.9% SLO over 30 days,
~100 requests/s, and an hour of healthy history at that rate already in the SLO window.

usage: scripts/signals-page-latency.py CUTOVER_BINARY [trials] [error_rate]"""
import http.server, json, os, socket, sqlite3, subprocess, sys, tempfile, threading, time, urllib.request

exe = sys.argv[1]
trials = int(sys.argv[2]) if len(sys.argv) > 2 else 3
error_rate = sys.argv[3] if len(sys.argv) > 3 else "1"

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

pages = []
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("status") == "firing" and any(a["labels"].get("severity") == "page" for a in body["alerts"]):
            pages.append(time.time())
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass

sink_port = free_port()
threading.Thread(target=http.server.HTTPServer(("127.0.0.1", sink_port), Sink).serve_forever, daemon=True).start()

def run(trial):
    d = tempfile.mkdtemp()
    api, web = free_port(), free_port()
    cfg = f'''
[daemon]
api = "127.0.0.1:{api}"
state_dir = "state"
[services.web]
listen = "127.0.0.1:{web}"
command = ["cutover", "demo-app", "--port", "{{port}}", "--version", "{{version}}"]
instances = 1
analysis = false
[services.web.canary]
steps = [ {{ weight = 100 }} ]
[[services.web.slo]]
name = "availability"
objective = 99.9
[[alerts.receivers]]
name = "hook"
kind = "webhook"
url = "http://127.0.0.1:{sink_port}/"
[[alerts.routes]]
matchers = ["severity=page"]
receiver = "hook"
'''
    open(f"{d}/cutover.toml", "w").write(cfg)
    env = dict(os.environ); env.pop("CUTOVER_SIGNALS_BUCKET", None)
    def up():
        p = subprocess.Popen([exe, "-c", f"{d}/cutover.toml", "up"], cwd=d, env=env,
                             stdout=subprocess.DEVNULL, stderr=open(f"{d}/daemon.log", "a"))
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{api}/healthz", timeout=1); return p
            except Exception: time.sleep(0.05)
        raise RuntimeError("daemon did not come up")
    # Create the schema, then seed the last hour with 100 requests/s of good traffic.
    p = up(); p.terminate(); p.wait()
    db = sqlite3.connect(f"{d}/state/state.db")
    now_min = int(time.time() // 60)
    for m in range(now_min - 60, now_min):
        db.execute("INSERT INTO signal_counts VALUES ('web','v1',?,60000,6000,0)", (m * 60000,))
    db.commit(); db.close()
    p = up()
    stop, first_error = threading.Event(), []
    def load():
        # ~100 requests/s from 4 threads, each paced to 25/s.
        s = None
        nxt = time.time()
        while not stop.is_set():
            try:
                r = urllib.request.urlopen(f"http://127.0.0.1:{web}/", timeout=2); r.read()
            except urllib.error.HTTPError as e:
                if e.code >= 500 and not first_error: first_error.append(time.time())
            except Exception: pass
            nxt += 0.04
            time.sleep(max(0, nxt - time.time()))
    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads: t.start()
    time.sleep(15 + 20 * trial)   # different moments within the minute
    pages.clear()
    subprocess.run([exe, "-c", f"{d}/cutover.toml", "deploy", "web", "v2", "--env", f"DEMO_ERROR_RATE={error_rate}"],
                   cwd=d, check=True, stdout=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not pages and time.time() < deadline: time.sleep(0.1)
    stop.set()
    p.terminate(); p.wait()
    if not pages or not first_error: return None
    return pages[0] - first_error[0]

for i in range(trials):
    dt = run(i)
    print(f"trial {i+1}: page {'never' if dt is None else f'{dt:.1f}s'} after the first 5xx (error rate {error_rate})", flush=True)
