#!/usr/bin/env python3
"""CPU of the signals thread while the proxy serves load: cutover (release, one worker thread,
pinned to CPU 1) in front of one nginx backend, an availability and a latency SLO configured,
wrk on CPU 0 for DURATION seconds. Prints requests/s and the CPU seconds of each of the daemon's
threads (by name), so the signals thread's share can be read off.

usage: scripts/signals-writer-cpu.py CUTOVER [DURATION] [CONNECTIONS]"""
import os, re, socket, subprocess, sys, tempfile, time, urllib.request

exe = sys.argv[1]
duration = int(sys.argv[2]) if len(sys.argv) > 2 else 60
conns = sys.argv[3] if len(sys.argv) > 3 else "16"

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

d = tempfile.mkdtemp()
backend, api, web = free_port(), free_port(), free_port()
open(f"{d}/nginx.conf", "w").write(f"""
worker_processes 1; daemon off; pid {d}/nginx.pid; error_log /dev/null;
events {{ worker_connections 1024; }}
http {{ access_log off; server {{ listen 127.0.0.1:{backend}; location / {{ return 200 "ok"; }} }} }}
""")
ng = subprocess.Popen(["taskset", "-c", "0", "nginx", "-c", f"{d}/nginx.conf"])
open(f"{d}/cutover.toml", "w").write(f"""
[daemon]
api = "127.0.0.1:{api}"
state_dir = "state"
worker_threads = 1
[services.web]
listen = "127.0.0.1:{web}"
runtime = "static"
version = "v1"
upstreams = {{ v1 = ["127.0.0.1:{backend}"] }}
[services.web.health]
path = "/"
[[services.web.slo]]
name = "availability"
objective = 99.9
[[services.web.slo]]
name = "latency"
objective = 99
latency = "50ms"
""")
cut = subprocess.Popen(["taskset", "-c", "1", exe, "-c", f"{d}/cutover.toml", "up"], cwd=d,
                       stdout=subprocess.DEVNULL, stderr=open(f"{d}/daemon.log", "w"))
for _ in range(200):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{web}/", timeout=1); break
    except Exception: time.sleep(0.05)

def threads():
    out = {}
    for tid in os.listdir(f"/proc/{cut.pid}/task"):
        try:
            st = open(f"/proc/{cut.pid}/task/{tid}/stat").read()
        except OSError:
            continue
        name = st[st.index("(") + 1:st.rindex(")")]
        f = st[st.rindex(")") + 2:].split()
        out[(tid, name)] = int(f[11]) + int(f[12])
    return out

tick = os.sysconf("SC_CLK_TCK")
time.sleep(12)  # the signals task's first rounds
before = threads()
w = subprocess.run(["taskset", "-c", "0", "wrk", "-t1", f"-c{conns}", f"-d{duration}s", f"http://127.0.0.1:{web}/"],
                   capture_output=True, text=True)
after = threads()
cut.terminate(); cut.wait(); ng.terminate(); ng.wait()
rps = re.search(r"Requests/sec:\s+([\d.]+)", w.stdout).group(1)
print(f"wrk: {rps} requests/s for {duration}s over {conns} connections")
by_name = {}
for k, v in after.items():
    by_name[k[1]] = by_name.get(k[1], 0) + (v - before.get(k, 0))
total = sum(by_name.values())
for name, t in sorted(by_name.items(), key=lambda x: -x[1]):
    print(f"  {name:<20} {t / tick:8.2f} s CPU  ({100.0 * t / max(total, 1):5.2f}% of the daemon)")
