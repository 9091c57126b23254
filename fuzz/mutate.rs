//! The stable toolchain's stand-in for cargo-fuzz: a small deterministic mutator run over the
//! committed corpus (`fuzz/corpus/TARGET/`) for a bounded time, by the fuzz tests that
//! `cargo test` runs (`crates/cutover-proxy/tests/fuzz.rs`, `crates/cutover-config/tests/fuzz.rs`
//! include this file by path). Coverage-guided fuzzing with cargo-fuzz (nightly) runs the
//! same checks on the same corpus; see `fuzz/README.md`.
//!
//! Each run is reproducible: a seed per target (`CUTOVER_FUZZ_SEED` overrides it) and a time
//! budget (`CUTOVER_FUZZ_SECS`, 3 s by default) that only decides how far along the same
//! sequence of inputs it gets. An input that makes a check panic is written to
//! `fuzz/artifacts/TARGET/` (as cargo-fuzz does), reported with how to replay it, and fails
//! the test; it then becomes a unit test next to the code it broke.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The longest input tried: a little more than the longest head the proxy reads.
const MAX_INPUT: usize = 72 * 1024;

/// xorshift64*: tiny, fast, and the same sequence everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Bytes that make parsers take a different branch.
const INTERESTING: &[u8] = b"\r\n\t :;,=\"'[]{}#\\/0179afAF-+.\x00\x7f\x80\xff";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The committed corpus of `target`, in name order. An empty or missing one is a failure,
/// never a silent skip.
pub fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = root().join("corpus").join(target);
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("no corpus at {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    let inputs: Vec<Vec<u8>> = names
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect();
    assert!(
        !inputs.is_empty(),
        "the corpus at {} is empty",
        dir.display()
    );
    inputs
}

/// One mutant of `input`: one to eight edits (bytes flipped, set, inserted, deleted or
/// repeated; dictionary words inserted; pieces of other corpus entries spliced in).
pub fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>], dict: &[&[u8]]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(out.len() + 1);
        match rng.below(10) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => out.insert(at, INTERESTING[rng.below(INTERESTING.len())]),
            3 | 4 if !dict.is_empty() => {
                let word = dict[rng.below(dict.len())];
                out.splice(at..at, word.iter().copied());
            }
            5 if !out.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            6 if !out.is_empty() => {
                // A run repeated: long lines, many headers, deep nesting.
                let start = rng.below(out.len());
                let end = (start + 1 + rng.below(32)).min(out.len());
                let piece = out[start..end].to_vec();
                for _ in 0..1 + rng.below(8) {
                    out.splice(at..at, piece.iter().copied());
                }
            }
            7 => {
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let start = rng.below(other.len());
                    let end = (start + 1 + rng.below(64)).min(other.len());
                    out.splice(at..at, other[start..end].iter().copied());
                }
            }
            8 => out.truncate(at),
            _ if !out.is_empty() => {
                // A number made large or odd where a digit was.
                if let Some(i) = (0..out.len())
                    .map(|k| (at + k) % out.len())
                    .find(|&i| out[i].is_ascii_digit())
                {
                    let n: &[u8] = [
                        &b"0"[..],
                        b"18446744073709551616",
                        b"ffffffffffffffff0",
                        b"-1",
                        b"+1",
                        b"1 1",
                    ][rng.below(6)];
                    out.splice(i..i + 1, n.iter().copied());
                }
            }
            _ => {}
        }
    }
    out.truncate(MAX_INPUT);
    out
}

fn seed_of(target: &str) -> u64 {
    if let Some(s) = std::env::var("CUTOVER_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return s;
    }
    // FNV-1a of the name: a fixed seed per target.
    target.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Runs `check` on every corpus entry, then on mutants for the time budget. Returns how many
/// inputs were tried.
pub fn run(target: &str, dict: &[&[u8]], check: fn(&[u8])) -> u64 {
    let corpus = corpus(target);
    let secs: f64 = std::env::var("CUTOVER_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let budget = Duration::from_secs_f64(secs);
    let seed = seed_of(target);
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut tried = 0u64;
    let attempt = |input: &[u8], tried: u64| {
        if std::panic::catch_unwind(|| check(input)).is_err() {
            let dir = root().join("artifacts").join(target);
            let _ = std::fs::create_dir_all(&dir);
            let file = dir.join(format!("crash-{seed}-{tried}"));
            let _ = std::fs::write(&file, input);
            panic!(
                "{target}: input {tried} (seed {seed}) broke a check; saved as {}; replay with CUTOVER_FUZZ_SEED={seed}, or add it to a unit test: {:?}",
                file.display(),
                input.escape_ascii().to_string()
            );
        }
    };
    for input in &corpus {
        attempt(input, tried);
        tried += 1;
    }
    // Mutants of mutants too: every few rounds the last mutant is mutated again.
    let mut last: Vec<u8> = Vec::new();
    while started.elapsed() < budget {
        for _ in 0..64 {
            let base = if !last.is_empty() && rng.below(4) == 0 {
                last.clone()
            } else {
                corpus[rng.below(corpus.len())].clone()
            };
            last = mutate(&mut rng, &base, &corpus, dict);
            attempt(&last, tried);
            tried += 1;
        }
    }
    eprintln!(
        "{target}: {tried} inputs in {:.1?} (seed {seed})",
        started.elapsed()
    );
    tried
}

/// Words of HTTP/1.1 that steer the head and chunk parsers.
pub const HTTP_WORDS: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"CONNECT ",
    b" HTTP/1.1\r\n",
    b" HTTP/1.0\r\n",
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n",
    b"HTTP/1.1 204 No Content\r\n",
    b"HTTP/1.1 304 Not Modified\r\n",
    b"HTTP/1.0 200 OK\r\n",
    b"Host: a\r\n",
    b"host: b\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: ",
    b"content-length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: chunked, gzip\r\n",
    b"transfer-encoding:  chunked \r\n",
    b"Connection: close\r\n",
    b"Connection: keep-alive, X-Secret\r\n",
    b"Connection: Upgrade\r\nUpgrade: websocket\r\n",
    b"Expect: 100-continue\r\n",
    b"Keep-Alive: timeout=5\r\n",
    b"TE: trailers\r\n",
    b"X-Forwarded-For: 10.0.0.1\r\n",
    b"X-Forwarded-Host: h\r\n",
    b"X-Cutover-Version: v2\r\n",
    b"0\r\n\r\n",
    b"5\r\nhello\r\n",
    b";ext=\"v\"",
    b"ffffffffffffffff",
    b"X-Trailer: 1\r\n",
    b" \r\n",
    b"\r\n ",
];

/// Words of `cutover.toml`.
pub const CONFIG_WORDS: &[&[u8]] = &[
    b"\n",
    b"[daemon]\n",
    b"[services.web]\n",
    b"[services.web.canary]\n",
    b"[services.web.health]\n",
    b"[services.web.analysis]\n",
    b"[services.web.blue_green]\n",
    b"[[services.web.smoke]]\n",
    b"api = \"0.0.0.0:7070\"\n",
    b"metrics = \"[::]:9100\"\n",
    b"state_dir = \"\"\n",
    b"listen = \"127.0.0.1:8080\"\n",
    b"version = \"-rf\"\n",
    b"version = \"v2\"\n",
    b"runtime = \"static\"\n",
    b"upstreams = { v1 = [\"127.0.0.1:1\"], \"--help\" = [] }\n",
    b"command = [\"app\", \"{port}\"]\n",
    b"command = []\n",
    b"steps = [ { weight = 10, pause = \"5s\" }, { approve = true }, { weight = 100 } ]\n",
    b"max_connections = 0\n",
    b"instances = 99999999999999999999\n",
    b"interval = \"0s\"\n",
    b"timeout = \"1h\"\n",
    b"analysis = false\n",
    b"env = { A = \"1\" }\n",
    b"= ",
    b"[[",
    b"]]",
    b"{ ",
    b" }",
    b"\"",
    b"'''",
    b"\"\"\"",
    b"\\u0000",
    b"\xc3\xa9",
    b"\xe2\x80\xa6",
    b"\r\n",
    b"# comment\n",
    b"1e999",
    b"-9223372036854775808",
    b"nan",
    b"1979-05-27T07:32:00Z",
];
