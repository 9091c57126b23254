#!/usr/bin/env bash
# Backup and restore of a ~100 MB PostgreSQL database and a ~100 MB SQLite database, by
# `cutover backup create|restore` and by the tools run by hand in the same run (pg_dump /
# pg_restore, sqlite3 .backup / .restore), interleaved, 3 rounds, medians; prints the ratios.
#
#   crates/cutover-safety/bench/backup_vs_tools.sh [path/to/cutover]   (default target/release/cutover)
#
# Needs PostgreSQL's server programs (initdb, pg_ctl: Debian's postgresql package), sqlite3 and
# python3. Runs the cluster as the `postgres` user (or `nobody`) when run as root.
set -euo pipefail
CUTOVER=$(realpath "${1:-target/release/cutover}")
ROUNDS=${ROUNDS:-3}
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$BIN/initdb" ] || { echo "PostgreSQL's server programs are not installed (apt-get install postgresql)" >&2; exit 2; }
command -v sqlite3 >/dev/null || { echo "sqlite3 is not installed (apt-get install sqlite3)" >&2; exit 2; }

work=$(mktemp -d)
as=()
if [ "$(id -u)" = 0 ]; then
  u=postgres; id "$u" >/dev/null 2>&1 || u=nobody
  chown "$u" "$work"; as=(runuser -u "$u" --)
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { "${as[@]}" "$BIN/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
"${as[@]}" "$BIN/initdb" -D "$work/data" -U cutover --auth=trust -E UTF8 --no-sync >/dev/null
"${as[@]}" "$BIN/pg_ctl" -D "$work/data" -l "$work/pg.log" -w \
  -o "-p $port -k $work -c listen_addresses=127.0.0.1" start >/dev/null
url="postgres://cutover@127.0.0.1:$port/shop"
psql() { "$BIN/psql" -X -q -v ON_ERROR_STOP=1 "$@"; }
psql -d "postgres://cutover@127.0.0.1:$port/postgres" -c "CREATE DATABASE shop"
psql -d "$url" -c "CREATE TABLE items (id bigserial PRIMARY KEY, name text, body text, price int);
  INSERT INTO items (name, body, price) SELECT 'item ' || g, repeat(md5(g::text), 3), g % 1000
  FROM generate_series(1, 530000) g;"
psql -d "$url" -c "VACUUM ANALYZE items"
pg_size=$(psql -At -d "$url" -c "SELECT pg_database_size('shop')")

mkdir -p "$work/app" && cd "$work/app"
python3 - <<'PY'
import sqlite3
c = sqlite3.connect("shop.db")
c.execute("PRAGMA journal_mode=WAL")
c.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, body TEXT, price INTEGER)")
import hashlib
c.executemany("INSERT INTO items (name, body, price) VALUES (?, ?, ?)",
              (("item %d" % i, hashlib.md5(str(i).encode()).hexdigest() * 3, i % 1000) for i in range(1, 800001)))
c.commit()
c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
PY
sq_size=$(stat -c %s shop.db)
cat > cutover.toml <<TOML
[daemon]
state_dir = "state"
[services.pg]
listen = "127.0.0.1:1"
command = ["true", "{port}"]
[services.pg.database]
kind = "postgres"
url = "$url"
[services.lite]
listen = "127.0.0.1:2"
command = ["true", "{port}"]
[services.lite.database]
kind = "sqlite"
path = "shop.db"
TOML

now() { date +%s.%N; }
t() { local a b; a=$(now); "$@" >/dev/null 2>&1 || { echo "failed: $*" >&2; exit 1; }; b=$(now); awk "BEGIN { print $b - $a }"; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A R
for r in $(seq "$ROUNDS"); do
  R[pg_dump]+=" $(t "$BIN/pg_dump" --format=custom --file=hand.dump --dbname="$url")"
  R[pg_restore]+=" $(t "$BIN/pg_restore" --clean --if-exists --single-transaction --no-owner --dbname="$url" hand.dump)"
  id=$("$CUTOVER" backup create pg --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  R[cut_pg_backup]+=" $(t "$CUTOVER" backup create pg)"
  R[cut_pg_restore]+=" $(t "$CUTOVER" backup restore pg "$id" --yes)"
  R[sqlite_backup]+=" $(t sqlite3 shop.db ".backup hand.db")"
  R[sqlite_restore]+=" $(t sqlite3 shop.db ".restore hand.db")"
  lid=$("$CUTOVER" backup create lite --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  R[cut_lite_backup]+=" $(t "$CUTOVER" backup create lite)"
  R[cut_lite_restore]+=" $(t "$CUTOVER" backup restore lite "$lid" --yes)"
  rm -rf state/backups
done
m() { median ${R[$1]}; }
printf 'PostgreSQL %s MB (pg_database_size), SQLite %s MB; %s rounds, medians, seconds\n' \
  $((pg_size / 1000000)) $((sq_size / 1000000)) "$ROUNDS"
printf '%-34s %8s %8s %7s\n' "" "by hand" "cutover" "ratio"
row() { printf '%-34s %8.2f %8.2f %6.2fx\n' "$1" "$2" "$3" "$(awk "BEGIN { print $3 / $2 }")"; }
row "PostgreSQL backup (pg_dump -Fc)" "$(m pg_dump)" "$(m cut_pg_backup)"
row "PostgreSQL restore (pg_restore)" "$(m pg_restore)" "$(m cut_pg_restore)"
row "SQLite backup (sqlite3 .backup)" "$(m sqlite_backup)" "$(m cut_lite_backup)"
row "SQLite restore (sqlite3 .restore)" "$(m sqlite_restore)" "$(m cut_lite_restore)"
