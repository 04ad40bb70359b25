//! The cost of fingerprinting one request's body, raw against JSON, timed in process (no server,
//! no store): `cargo run --release -p idem-runtime --example fingerprint_cost`.
//!
//! Bodies of 1 KiB and 1 MiB: payment-like JSON objects, pretty-printed with their members out of
//! order (so the canonical form reorders every object), and, as a worst case, 1 MiB nested 128
//! deep with every level out of order. Each row is timed in the same run, raw and JSON
//! interleaved, and the ratio is JSON over raw. Performance figures come from here, never from
//! tests.

use std::{hint::black_box, time::Instant};

use idem_runtime::{__private::FingerprintMode, testing::fingerprint_request};

const JSON: FingerprintMode = FingerprintMode::Json { ignore: &[] };
const JSON_IGNORING: FingerprintMode = FingerprintMode::Json {
    ignore: &[&["client_ts"], &["items", "0", "trace_id"]],
};

/// One payment-like object, members in reverse order, pretty-printed.
fn item(n: usize) -> String {
    format!(
        "{{\n    \"trace_id\": \"t-{n:08}\",\n    \"metadata\": {{ \"order\": \"ord_{n}\", \"note\": \"caf\\u00e9 \\/ r\\u00e9f {n}\" }},\n    \"destination\": \"acct_{n}\",\n    \"currency\": \"EUR\",\n    \"amount\": {}\n  }}",
        1000 + n
    )
}

/// `{"items": [...], "client_ts": ...}` of about `size` bytes.
fn payments(size: usize) -> Vec<u8> {
    let mut items = Vec::new();
    let mut len = 40;
    while len < size {
        let item = item(items.len());
        len += item.len() + 4;
        items.push(item);
    }
    format!(
        "{{\n  \"items\": [\n  {}\n  ],\n  \"client_ts\": 1733300000\n}}\n",
        items.join(",\n  ")
    )
    .into_bytes()
}

/// 1 MiB nested 128 deep, each level's members out of order: the most the canonical form moves.
fn deep(size: usize) -> Vec<u8> {
    let depth = 127;
    let filler = "x".repeat(size / 2);
    let mut body = format!("{{\"z\":\"{filler}\",\"y\":{{\"q\":\"{filler}\"}}}}");
    for _ in 0..depth {
        body = format!("{{\"b\":{body},\"a\":1}}");
    }
    body.into_bytes()
}

/// Nanoseconds per fingerprint, the best of `rounds` rounds of `iterations`.
fn time(mode: FingerprintMode, body: &[u8], iterations: u32) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        for _ in 0..iterations {
            black_box(fingerprint_request(mode, black_box(body)));
        }
        best = best.min(started.elapsed().as_nanos() as f64 / f64::from(iterations));
    }
    best
}

fn human(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.1} µs", ns / 1e3)
    }
}

fn main() {
    println!("| body | raw | json | json/raw | json, 2 pointers ignored | /raw |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, body, iterations) in [
        ("1 KiB payments", payments(1024), 20_000),
        ("1 MiB payments", payments(1 << 20), 20),
        ("1 MiB, 128 deep, unordered", deep(1 << 20), 20),
    ] {
        let raw = time(FingerprintMode::Raw, &body, iterations);
        let json = time(JSON, &body, iterations);
        let ignoring = time(JSON_IGNORING, &body, iterations);
        println!(
            "| {name} ({} B) | {} | {} | {:.2} | {} | {:.2} |",
            body.len(),
            human(raw),
            human(json),
            json / raw,
            human(ignoring),
            ignoring / raw,
        );
    }
}
