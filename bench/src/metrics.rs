//! What memgate's admin listener says on `GET /metrics` (OpenMetrics text): the
//! guard's reserved bytes, pressure level, budget and limit, and the admission
//! and purge counters. A blocking HTTP/1.0 request on its own connection, so the
//! sampler thread needs no runtime; the response and the text are parsed by pure
//! functions, tested below on real output.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use prometheus_parse::{Scrape, Value};

/// One scrape, reduced to what the bench reports. Counters are totals since the
/// server started; `None` where the server does not export the family.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct GuardReading {
    pub guard_enabled: Option<bool>,
    pub limit: Option<u64>,
    pub budget: Option<u64>,
    pub working_set: Option<u64>,
    pub reserved: Option<u64>,
    /// 0 normal, 1 elevated, 2 critical.
    pub pressure: Option<u8>,
    /// Admissions granted, every method.
    pub admitted: Option<u64>,
    /// RESOURCE_EXHAUSTED answers by the guard, every method and reason.
    pub rejected: Option<u64>,
    pub purges: Option<u64>,
    pub purge_released: Option<u64>,
    pub oom_kills: Option<u64>,
}

/// `GET /metrics` from `admin`, parsed.
pub fn scrape(admin: SocketAddr, timeout: Duration) -> io::Result<GuardReading> {
    let mut stream = TcpStream::connect_timeout(&admin, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    // HTTP/1.0: the answer is the body up to the close, never chunked.
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: memgate\r\n\r\n")?;
    let mut response = Vec::with_capacity(16 * 1024);
    stream.read_to_end(&mut response)?;
    let body = http_body(&response).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut r = reading(body);
    // A labelled counter family shows no sample before its first increment.
    for counter in [&mut r.admitted, &mut r.rejected] {
        counter.get_or_insert(0);
    }
    Ok(r)
}

/// The body of an HTTP/1.x `200` response.
fn http_body(response: &[u8]) -> Result<&str, String> {
    let text = std::str::from_utf8(response).map_err(|e| format!("not UTF-8: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "no end of headers in the response".to_string())?;
    let status = head.lines().next().unwrap_or_default();
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(body),
        _ => Err(format!("answered {status:?}")),
    }
}

/// The figures of one exposition.
pub fn reading(text: &str) -> GuardReading {
    let scrape = match Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))) {
        Ok(s) => s,
        Err(_) => return GuardReading::default(),
    };
    // Summed over every label set: the bench wants totals, not per method.
    let sum = |name: &str| -> Option<f64> {
        let mut found = false;
        let mut total = 0.0;
        for sample in scrape.samples.iter().filter(|s| s.metric == name) {
            if let Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) = sample.value {
                found = true;
                total += v;
            }
        }
        found.then_some(total)
    };
    let bytes = |name: &str| sum(name).map(|v| v.max(0.0) as u64);
    GuardReading {
        guard_enabled: sum("memgate_guard_enabled").map(|v| v != 0.0),
        limit: bytes("memgate_memory_limit_bytes"),
        budget: bytes("memgate_memory_budget_bytes"),
        working_set: bytes("memgate_memory_working_set_bytes"),
        reserved: bytes("memgate_memory_reserved_bytes"),
        pressure: sum("memgate_memory_pressure_level").map(|v| v as u8),
        admitted: bytes("memgate_admission_admitted_total"),
        rejected: bytes("memgate_admission_rejected_total"),
        purges: bytes("memgate_purges_total"),
        purge_released: bytes("memgate_purge_released_bytes_total"),
        oom_kills: bytes("memgate_cgroup_oom_kills_total"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from a real memgate exposition.
    const EXPOSITION: &str = r#"# HELP memgate_admission_admitted Admissions granted.
# TYPE memgate_admission_admitted counter
memgate_admission_admitted_total{method="/google.bytestream.ByteStream/Write"} 12
memgate_admission_admitted_total{method="/memgate.v1.Payload/Process"} 3
# HELP memgate_admission_rejected Calls refused with RESOURCE_EXHAUSTED, by reason.
# TYPE memgate_admission_rejected counter
memgate_admission_rejected_total{method="/memgate.v1.Payload/Process",reason="queue_timeout"} 4
memgate_admission_rejected_total{method="/google.bytestream.ByteStream/Write",reason="no_room"} 1
# HELP memgate_memory_limit_bytes Memory limit the guard works with.
# TYPE memgate_memory_limit_bytes gauge
# UNIT memgate_memory_limit_bytes bytes
memgate_memory_limit_bytes 536870912
# TYPE memgate_memory_budget_bytes gauge
# UNIT memgate_memory_budget_bytes bytes
memgate_memory_budget_bytes 422785843
# TYPE memgate_memory_working_set_bytes gauge
memgate_memory_working_set_bytes 10285056
# TYPE memgate_memory_reserved_bytes gauge
# UNIT memgate_memory_reserved_bytes bytes
memgate_memory_reserved_bytes 20971520
# TYPE memgate_memory_pressure_level gauge
memgate_memory_pressure_level 1
# TYPE memgate_guard_enabled gauge
memgate_guard_enabled 1
# TYPE memgate_cgroup_oom_kills counter
memgate_cgroup_oom_kills_total 0
# TYPE memgate_purges counter
memgate_purges_total 7
# TYPE memgate_purge_released_bytes counter
# UNIT memgate_purge_released_bytes bytes
memgate_purge_released_bytes_total 314572800
# EOF
"#;

    #[test]
    fn reads_the_guard_figures() {
        let r = reading(EXPOSITION);
        assert_eq!(
            r,
            GuardReading {
                guard_enabled: Some(true),
                limit: Some(536_870_912),
                budget: Some(422_785_843),
                working_set: Some(10_285_056),
                reserved: Some(20 * 1024 * 1024),
                pressure: Some(1),
                admitted: Some(15),
                rejected: Some(5),
                purges: Some(7),
                purge_released: Some(314_572_800),
                oom_kills: Some(0),
            }
        );
        assert_eq!(reading("# EOF\n"), GuardReading::default());
    }

    #[test]
    fn takes_the_body_of_a_200_only() {
        let ok = b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nmemgate_purges_total 1\n";
        assert_eq!(http_body(ok), Ok("memgate_purges_total 1\n"));
        let busy = b"HTTP/1.1 503 Service Unavailable\r\n\r\nno";
        assert!(http_body(busy).unwrap_err().contains("503"));
        assert!(http_body(b"HTTP/1.0 200 OK\r\n").is_err());
    }
}
