//! `cachecast status`: the sidecar's `/v1/status` as a readable table.

use std::fmt::Write as _;

use serde_json::Value;

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn ago(ms: &Value) -> String {
    match ms.as_u64() {
        None => "never".into(),
        Some(ms) if ms < 1000 => format!("{ms} ms ago"),
        Some(ms) if ms < 120_000 => format!("{:.1} s ago", ms as f64 / 1000.0),
        Some(ms) => format!("{} min ago", ms / 60_000),
    }
}

/// Renders a `/v1/status` body as a table (missing fields show as `-`).
pub fn status_table(body: &Value) -> String {
    let mut out = String::new();
    let c = &body["counters"];
    let _ = writeln!(
        out,
        "node {}  incarnation {}  last seq {}",
        text(&body["node"]),
        text(&body["incarnation"]),
        text(&body["last_seq"])
    );
    let _ = writeln!(
        out,
        "buffer {}/{} held, {} overflows   sent {}  received {}  flushes {}  rejected connections {}",
        text(&body["buffered"]),
        text(&body["buffer_capacity"]),
        text(&body["buffer_overflows"]),
        text(&c["sent"]),
        text(&c["received"]),
        text(&c["flushes_received"]),
        text(&c["rejected_connections"]),
    );
    let _ = writeln!(
        out,
        "\n{:<28} {:<12} {:>8} {:>10} {:>10} {:>12}",
        "PEER", "STATE", "QUEUED", "ACKED SEQ", "RECONNECTS", "LAST HEARD"
    );
    let empty = Vec::new();
    for p in body["peers"].as_array().unwrap_or(&empty) {
        let state = match (p["outbound"].as_bool(), p["inbound"].as_bool()) {
            (Some(true), Some(true)) => "up",
            (Some(true), _) => "half (out)",
            (_, Some(true)) => "half (in)",
            _ => "DOWN",
        };
        let _ = writeln!(
            out,
            "{:<28} {:<12} {:>8} {:>10} {:>10} {:>12}",
            text(&p["id"]),
            state,
            text(&p["queued"]),
            text(&p["acked_seq"]),
            text(&p["reconnects"]),
            ago(&p["last_heard_ms"])
        );
        if let Some(err) = p["last_error"].as_str() {
            let _ = writeln!(out, "    last error: {err}");
        }
    }
    let s = &body["sidecar"];
    if s.is_object() {
        // Absent from an older sidecar's status: nothing said then.
        let token = match s["api_token"].as_bool() {
            Some(true) => format!(
                "  token required (refused {})",
                text(&s["api_unauthorized"])
            ),
            Some(false) => "  no token".to_string(),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "\napi {}{token}  event clients {}  events held {}/{}",
            text(&s["api"]),
            text(&s["sse_clients"]),
            text(&s["events_held"]),
            text(&s["events_capacity"])
        );
        if s["webhook"].is_object() {
            let w = &s["webhook"];
            let _ = writeln!(
                out,
                "webhook {}  delivered {}  failures {}  pending {}",
                text(&w["url"]),
                text(&w["delivered"]),
                text(&w["failures"]),
                text(&w["pending"])
            );
        }
        if s["resp"].is_object() {
            let r = &s["resp"];
            let listen: Vec<String> = r["listen"]
                .as_array()
                .map(|a| a.iter().map(text).collect())
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "redis {}  connections {}/{}  channels {}  patterns {}  published {}  delivered {}  slow subscribers cut off {}",
                listen.join(" "),
                text(&r["connections"]),
                text(&r["max_connections"]),
                text(&r["channels"]),
                text(&r["patterns"]),
                text(&r["published"]),
                text(&r["delivered"]),
                text(&r["slow_dropped"])
            );
        }
        if s["flush_hook"].is_object() {
            let h = &s["flush_hook"];
            let state = match h["pending_seconds"].as_f64() {
                Some(secs) => format!("PENDING for {secs:.0}s ({})", text(&h["last_reason"])),
                None => "nothing pending".to_string(),
            };
            // Only once it matters: a rise means some local process
            // subscribes and leaves in a loop.
            let limited = match h["rate_limited"].as_u64() {
                Some(n) if n > 0 => format!("  rate-limited {n}"),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "flush hook {}  {state}  calls {}  failures {}{limited}",
                text(&h["url"]),
                text(&h["calls"]),
                text(&h["failures"])
            );
            if let Some(err) = h["last_error"].as_str() {
                let _ = writeln!(out, "    last error: {err}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_peers_and_tolerates_missing_fields() {
        let body = serde_json::json!({
            "node": "127.0.0.1:4001",
            "peers": [
                {"id": "127.0.0.1:4002", "outbound": true, "inbound": true, "queued": 0, "acked_seq": 7, "reconnects": 1, "last_heard_ms": 12},
                {"id": "127.0.0.1:4003", "outbound": false, "inbound": false, "queued": 5, "acked_seq": 0, "last_heard_ms": null}
            ]
        });
        let t = status_table(&body);
        assert!(t.contains("127.0.0.1:4002"));
        assert!(t.contains("DOWN"));
        assert!(t.contains("never"));
        assert!(status_table(&serde_json::json!("garbage")).contains("PEER"));
        let sidecar = serde_json::json!({"node": "n", "peers": [], "sidecar": {
            "api": "127.0.0.1:4002", "api_token": true, "api_unauthorized": 3,
            "flush_hook": {"url": "http://h/", "calls": 6, "failures": 0, "rate_limited": 14}
        }});
        let t = status_table(&sidecar);
        assert!(
            t.contains("api 127.0.0.1:4002  token required (refused 3)"),
            "{t}"
        );
        assert!(t.contains("calls 6  failures 0  rate-limited 14"), "{t}");
    }
}
