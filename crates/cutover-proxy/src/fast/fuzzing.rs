//! The fast path's parsers run on arbitrary bytes with their invariants checked, for the
//! cargo-fuzz targets in `fuzz/` and the seeded fuzz tests that run in `cargo test`. Each
//! function panics, with the input in its message, when an invariant does not hold; a
//! clean return says nothing more than "no finding".
//!
//! Beyond "no panic", what must hold is what keeps requests from being smuggled: a head is
//! never taken past the bytes given, the head the proxy writes for an instance reads back
//! with the same method, target, Host and body framing (and no hop-by-hop header), an
//! answer's head reads back with the same status and framing, and a chunked body ends at the
//! same byte however its bytes are split into reads.

use std::ops::Range;

use http::HeaderValue;

use super::{
    Chunk, Framing, Line, MAX_HEADERS, Parsed, ParsedAnswer, parse_request, parse_request_with,
    parse_response, parse_response_with, slice, write_request, write_response,
};

/// Room for the lines the proxy adds when it writes a head back (X-Forwarded-*, Connection).
const MORE: usize = MAX_HEADERS + 8;

fn shown(data: &[u8]) -> String {
    data.escape_ascii().to_string()
}

fn within(r: &Range<usize>, len: usize) -> bool {
    r.start <= r.end && r.end <= len
}

fn lines_within(lines: &[Line], len: usize) -> bool {
    lines
        .iter()
        .all(|l| within(&l.name, len) && within(&l.value, len))
}

/// The same delimitation: the same kind, and the same length when there is one.
fn same_framing(a: &Framing, b: &Framing) -> bool {
    match (a, b) {
        (Framing::Empty, Framing::Empty)
        | (Framing::Chunked(_), Framing::Chunked(_))
        | (Framing::Close, Framing::Close) => true,
        (Framing::Length(x), Framing::Length(y)) => x == y,
        _ => false,
    }
}

/// Header names that must never reach an instance. Transfer-Encoding is hop-by-hop too, but
/// the fast path passes a chunked body on verbatim, so it passes its framing line with it.
const NEVER_FORWARDED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

/// Parses `data` as a client's request head (what the fast path does with every request).
pub fn request_head(data: &[u8]) {
    let mut lines = Vec::new();
    let Parsed::Take(head) = parse_request(data, &mut lines) else {
        return;
    };
    let len = head.len;
    assert!(len <= data.len(), "head past its bytes: {}", shown(data));
    let ranges = [&head.method, &head.target, &head.host]
        .into_iter()
        .chain(head.pin.as_ref())
        .chain(head.forwarded_for.as_ref());
    for r in ranges {
        assert!(within(r, len), "{r:?} past the head: {}", shown(data));
    }
    assert!(
        lines_within(&lines, len),
        "a line past the head: {}",
        shown(data)
    );
    // The head alone is taken the same way.
    match parse_request(&data[..len], &mut Vec::new()) {
        Parsed::Take(h) => assert_eq!(h.len, len, "{}", shown(data)),
        other => panic!("the head alone reads as {other:?}: {}", shown(data)),
    }
    // What the instance is sent reads back as the same request.
    let peer = HeaderValue::from_static("192.0.2.1");
    let mut out = Vec::new();
    write_request(Some(&peer), &head, data, &lines, &mut out);
    let mut back_lines = Vec::new();
    let back = match parse_request_with::<MORE>(&out, &mut back_lines) {
        Parsed::Take(h) => h,
        other => panic!(
            "the upstream head {} reads as {other:?}; from {}",
            shown(&out),
            shown(data)
        ),
    };
    let same =
        |a: &Range<usize>, b: &Range<usize>| slice(data, a.clone()) == slice(&out, b.clone());
    assert_eq!(back.len, out.len(), "{}", shown(&out));
    assert!(
        same(&head.method, &back.method)
            && same(&head.target, &back.target)
            && same(&head.host, &back.host),
        "method, target or Host changed: {} → {}",
        shown(data),
        shown(&out)
    );
    assert!(
        same_framing(&head.body, &back.body),
        "body framing changed ({:?} → {:?}): {} → {}",
        head.body,
        back.body,
        shown(data),
        shown(&out)
    );
    for l in &back_lines {
        let name = slice(&out, l.name.clone());
        assert!(
            !NEVER_FORWARDED
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n.as_bytes())),
            "{} forwarded: {}",
            shown(name),
            shown(&out)
        );
    }
}

/// Parses `data` as an instance's answer to a request (`HEAD` when `is_head`).
pub fn response_head(data: &[u8], is_head: bool) {
    let mut lines = Vec::new();
    let answer = match parse_response(data, is_head, &mut lines) {
        ParsedAnswer::Interim(n) => {
            assert!(n > 0 && n <= data.len(), "interim of {n}: {}", shown(data));
            return;
        }
        ParsedAnswer::Head(a) => a,
        ParsedAnswer::Partial | ParsedAnswer::Bad(_) => return,
    };
    let len = answer.len;
    assert!(len <= data.len(), "head past its bytes: {}", shown(data));
    assert!(within(&answer.reason, len), "{}", shown(data));
    assert!(
        lines_within(&lines, len),
        "a line past the head: {}",
        shown(data)
    );
    for close in [false, true] {
        let mut out = Vec::new();
        write_response(&answer, data, &lines, close, &mut out);
        let back = match parse_response_with::<MORE>(&out, is_head, &mut Vec::new()) {
            ParsedAnswer::Head(a) => a,
            other => panic!(
                "the client's head {} does not read back ({}); from {}",
                shown(&out),
                match other {
                    ParsedAnswer::Bad(why) => why,
                    _ => "partial or interim".to_owned(),
                },
                shown(data)
            ),
        };
        assert_eq!(back.len, out.len(), "{}", shown(&out));
        assert_eq!(back.status, answer.status, "{}", shown(&out));
        assert!(
            same_framing(&answer.framing, &back.framing),
            "framing changed ({:?} → {:?}): {} → {}",
            answer.framing,
            back.framing,
            shown(data),
            shown(&out)
        );
        assert!(!close || !back.reusable, "close not said: {}", shown(&out));
    }
}

/// Follows `data[1..]` as a chunked body, whole and in pieces of `data[0] % 17 + 1` bytes
/// and of one byte: the same end (or the same refusal) every way.
pub fn chunked(data: &[u8]) {
    let Some((&step, body)) = data.split_first() else {
        return;
    };
    let mut whole = Chunk::default();
    let whole_result = whole.feed(body);
    if let Ok(n) = whole_result {
        assert!(n <= body.len(), "ended past the bytes: {}", shown(body));
        assert!(
            n == body.len() || whole == Chunk::Done,
            "stopped at {n} without an end: {}",
            shown(body)
        );
    }
    for size in [usize::from(step % 17) + 1, 1] {
        let mut c = Chunk::default();
        let mut at = 0;
        let mut failed = false;
        for piece in body.chunks(size) {
            match c.feed(piece) {
                Ok(n) => {
                    assert!(n <= piece.len(), "{}", shown(body));
                    at += n;
                    if n < piece.len() {
                        assert_eq!(c, Chunk::Done, "{}", shown(body));
                        break;
                    }
                }
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        match whole_result {
            Ok(n) => assert!(
                !failed && at == n && c == whole,
                "in pieces of {size}: {at} ({c:?}, failed {failed}) against {n} ({whole:?}): {}",
                shown(body)
            ),
            Err(_) => assert!(
                failed,
                "in pieces of {size} it did not fail: {}",
                shown(body)
            ),
        }
    }
}
