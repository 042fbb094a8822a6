//! What memgate's admin listener says on `GET /metrics` (OpenMetrics text): the
//! guard's reserved bytes, pressure level, budget and limit, the admission and
//! purge counters, and (from servers that export them) the largest client's
//! reservation and the reclaims by reason. A blocking HTTP/1.0 request on its own connection, so the
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
    /// `memgate_memory_largest_client_reserved_bytes`: what the client holding
    /// most has reserved. `None` (and left out of the JSON) where not exported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub largest_client_reserved: Option<u64>,
    /// `memgate_memory_reclaimed{,_bytes}_total` by reason, every method summed;
    /// `None` (and left out of the JSON) where the families are not exported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reclaims: Option<Reclaims>,
}

/// Memory the guard took back from admitted calls, by reason (totals since
/// the server started).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Reclaims {
    /// From a client holding more than its share while others waited.
    pub share: Reclaimed,
    /// From a stream that received nothing for the grace period.
    pub idle: Reclaimed,
    /// Because reservations exceeded the budget.
    pub overcommit: Reclaimed,
    /// Any reason this bench does not know by name.
    pub other: Reclaimed,
}

/// How many reclaims, and how many bytes they released.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Reclaimed {
    pub count: u64,
    pub bytes: u64,
}

impl Reclaims {
    /// Every reason together.
    pub fn total(&self) -> Reclaimed {
        let all = [self.share, self.idle, self.overcommit, self.other];
        Reclaimed {
            count: all.iter().map(|r| r.count).sum(),
            bytes: all.iter().map(|r| r.bytes).sum(),
        }
    }

    /// What happened between `earlier` and `self` (counters only grow; a
    /// restarted server's would not, and saturate at 0).
    pub fn since(&self, earlier: &Reclaims) -> Reclaims {
        let d = |a: Reclaimed, b: Reclaimed| Reclaimed {
            count: a.count.saturating_sub(b.count),
            bytes: a.bytes.saturating_sub(b.bytes),
        };
        Reclaims {
            share: d(self.share, earlier.share),
            idle: d(self.idle, earlier.idle),
            overcommit: d(self.overcommit, earlier.overcommit),
            other: d(self.other, earlier.other),
        }
    }

    fn of(&mut self, reason: &str) -> &mut Reclaimed {
        match reason {
            "share" => &mut self.share,
            "idle" => &mut self.idle,
            "overcommit" => &mut self.overcommit,
            _ => &mut self.other,
        }
    }
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
        largest_client_reserved: bytes("memgate_memory_largest_client_reserved_bytes"),
        reclaims: reclaims(text, &scrape),
    }
}

/// The reclaim counters by reason. A labelled family shows no sample before its
/// first increment, so a family that is declared (`# TYPE`) but empty is zero,
/// and one that is not declared at all is `None`: a server without reclaim.
fn reclaims(text: &str, scrape: &Scrape) -> Option<Reclaims> {
    let declared = |family: &str| {
        text.lines().any(|l| {
            l.strip_prefix("# TYPE ")
                .and_then(|rest| rest.split_whitespace().next())
                .is_some_and(|name| name == family || name == format!("{family}_total"))
        })
    };
    let (count, bytes) = ("memgate_memory_reclaimed", "memgate_memory_reclaimed_bytes");
    if !declared(count) && !declared(bytes) {
        return None;
    }
    let mut r = Reclaims::default();
    for sample in &scrape.samples {
        let (Value::Counter(v) | Value::Untyped(v)) = sample.value else {
            continue;
        };
        let reason = sample.labels.get("reason").unwrap_or_default();
        let v = v.max(0.0) as u64;
        if sample.metric == format!("{count}_total") {
            r.of(reason).count += v;
        } else if sample.metric == format!("{bytes}_total") {
            r.of(reason).bytes += v;
        }
    }
    Some(r)
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
                largest_client_reserved: None,
                reclaims: None,
            }
        );
        assert_eq!(reading("# EOF\n"), GuardReading::default());
    }

    #[test]
    fn reads_reclaims_and_the_largest_client() {
        // The families the guard exports once it reclaims; the counters by
        // reason summed over methods, an unknown reason kept apart.
        let text = r#"# TYPE memgate_memory_reserved_bytes gauge
memgate_memory_reserved_bytes 41943040
# TYPE memgate_memory_largest_client_reserved_bytes gauge
# UNIT memgate_memory_largest_client_reserved_bytes bytes
memgate_memory_largest_client_reserved_bytes 20971520
# TYPE memgate_memory_reclaimed counter
memgate_memory_reclaimed_total{method="/google.bytestream.ByteStream/Write",reason="share"} 3
memgate_memory_reclaimed_total{method="/google.bytestream.ByteStream/Read",reason="share"} 1
memgate_memory_reclaimed_total{method="/google.bytestream.ByteStream/Write",reason="idle"} 2
memgate_memory_reclaimed_total{method="/google.bytestream.ByteStream/Write",reason="later"} 1
# TYPE memgate_memory_reclaimed_bytes counter
# UNIT memgate_memory_reclaimed_bytes bytes
memgate_memory_reclaimed_bytes_total{method="/google.bytestream.ByteStream/Write",reason="share"} 62914560
memgate_memory_reclaimed_bytes_total{method="/google.bytestream.ByteStream/Write",reason="idle"} 41943040
# EOF
"#;
        let r = reading(text);
        assert_eq!(r.largest_client_reserved, Some(20 * 1024 * 1024));
        let reclaims = r.reclaims.expect("declared families");
        assert_eq!(
            reclaims.share,
            Reclaimed {
                count: 4,
                bytes: 60 * 1024 * 1024
            }
        );
        assert_eq!(
            reclaims.idle,
            Reclaimed {
                count: 2,
                bytes: 40 * 1024 * 1024
            }
        );
        assert_eq!(reclaims.overcommit, Reclaimed::default());
        assert_eq!(reclaims.other.count, 1);
        assert_eq!(reclaims.total().count, 7);
        let later = Reclaims {
            idle: Reclaimed { count: 5, bytes: 1 },
            ..reclaims
        };
        assert_eq!(later.since(&reclaims).idle.count, 3);
        assert_eq!(later.since(&reclaims).share, Reclaimed::default());

        // Declared but not yet incremented: zero, not absent.
        let empty = reading("# TYPE memgate_memory_reclaimed counter\n# EOF\n");
        assert_eq!(empty.reclaims, Some(Reclaims::default()));
        // Not declared at all (a server without reclaim): absent.
        assert_eq!(reading(EXPOSITION).reclaims, None);
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
