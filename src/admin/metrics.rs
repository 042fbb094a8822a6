//! memgate's Prometheus metrics. [`Metrics`] owns what the server counts as it
//! goes (admission decisions, through [`AdmissionObserver`], and finished
//! requests, from the access log) and renders them with what the guard shows
//! at scrape time ([`scrape`]) in the OpenMetrics text format.
//!
//! Every label is bounded: a method is one of a handful of known paths or
//! "other", never a resource name or a digest. Serving `/metrics` over HTTP is
//! [`super::http`]'s business, not this module's.

mod scrape;

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use tonic::Code;

use crate::guard::{Guard, layer::AdmissionObserver};
use crate::store::DiskSpace;

/// The `Content-Type` of [`Metrics::encode`]'s output. Prometheus needs it to
/// read counters right: OpenMetrics names a counter family without `_total`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const PREFIX: &str = "memgate";

/// Admission waits end by `queue_timeout` (2 s by default) or the call's own
/// deadline; 30 s covers a generously configured queue.
const WAIT_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// From a rejection (well under 1 ms) to a large upload from a slow client.
const DURATION_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// From a HEAD on loopback (under 1 ms) to an 8 MiB part over a slow link.
const STORE_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpOutcome {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodReason {
    method: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodCode {
    method: &'static str,
    code: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// The metrics of one server. Cheap to clone: clones share the counters.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    admitted: Family<MethodLabel, Counter>,
    queued: Family<MethodLabel, Counter>,
    rejected: Family<MethodReason, Counter>,
    cut: Family<MethodReason, Counter>,
    reclaimed: Family<MethodReason, Counter>,
    reclaimed_bytes: Family<MethodReason, Counter>,
    wait: Histograms<MethodLabel>,
    reserved: Family<MethodLabel, Counter>,
    in_flight: Family<MethodLabel, Gauge>,
    received: Family<MethodLabel, Counter>,
    sent: Family<MethodLabel, Counter>,
    duration: Histograms<MethodCode>,
    requests: Family<MethodCode, Counter>,
    backend: Family<BackendLabel, Gauge>,
    store_requests: Family<OpOutcome, Counter>,
    store_duration: Histograms<OpLabel>,
    connections_open: Gauge,
    connections_refused: Family<ReasonLabel, Counter>,
    connections_closed_idle: Counter,
    /// The local store's disk budget, read at each scrape.
    disk: OnceLock<DiskSpace>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family the server updates as it goes.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix(PREFIX);
        let admitted = Family::default();
        r.register(
            "admission_admitted",
            "Admissions granted: new calls, and handlers growing their reservation",
            admitted.clone(),
        );
        let queued = Family::default();
        r.register(
            "admission_queued",
            "Calls that had to wait in the admission queue",
            queued.clone(),
        );
        let rejected = Family::default();
        r.register(
            "admission_rejected",
            "Calls refused with RESOURCE_EXHAUSTED, by reason",
            rejected.clone(),
        );
        let cut = Family::default();
        r.register(
            "streams_cut",
            "Calls cut with DEADLINE_EXCEEDED because the client stopped sending or reading \
             (request_idle, response_idle) or was below server.min_throughput (request_slow, response_slow)",
            cut.clone(),
        );
        let reclaimed = Family::default();
        r.register(
            "memory_reclaimed",
            "Calls ended with RESOURCE_EXHAUSTED to give their memory to waiting calls, by reason: \
             share (their client held more than memory.max_client_share while others waited), \
             idle (no data for memory.reclaim_grace while calls waited), overcommit (the limit \
             fell below what was reserved)",
            reclaimed.clone(),
        );
        let reclaimed_bytes = Family::default();
        r.register_with_unit(
            "memory_reclaimed",
            "Bytes of reservations reclaimed, by reason (see memgate_memory_reclaimed_total)",
            Unit::Bytes,
            reclaimed_bytes.clone(),
        );
        let wait: Histograms<MethodLabel> =
            Family::new_with_constructor(|| Histogram::new(WAIT_BUCKETS));
        r.register_with_unit(
            "admission_wait",
            "Time queued calls waited before they were admitted",
            Unit::Seconds,
            wait.clone(),
        );
        let reserved = Family::default();
        r.register_with_unit(
            "admission_reserved",
            "Memory reserved by admitted calls (estimates, not allocations)",
            Unit::Bytes,
            reserved.clone(),
        );
        let in_flight = Family::default();
        r.register("requests_in_flight", "Calls in progress", in_flight.clone());
        let received = Family::default();
        r.register_with_unit(
            "received",
            "Request body bytes read (gRPC framing included)",
            Unit::Bytes,
            received.clone(),
        );
        let sent = Family::default();
        r.register_with_unit(
            "sent",
            "Response body bytes sent (gRPC framing included)",
            Unit::Bytes,
            sent.clone(),
        );
        let duration: Histograms<MethodCode> =
            Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS));
        r.register_with_unit(
            "request_duration",
            "Time from a call's arrival to the end of its response",
            Unit::Seconds,
            duration.clone(),
        );
        let requests = Family::default();
        r.register(
            "requests",
            "Calls finished, by gRPC status; \"cancelled\" includes clients that went away",
            requests.clone(),
        );
        let backend = Family::default();
        r.register(
            "storage_backend",
            "The blob store in use: 1 for the configured backend",
            backend.clone(),
        );
        let store_requests = Family::default();
        r.register(
            "object_store_requests",
            "Requests to the object store (s3 backend), by operation and outcome",
            store_requests.clone(),
        );
        let store_duration: Histograms<OpLabel> =
            Family::new_with_constructor(|| Histogram::new(STORE_BUCKETS));
        r.register_with_unit(
            "object_store_request_duration",
            "Time each object-store request took, retries included",
            Unit::Seconds,
            store_duration.clone(),
        );
        let connections_open = Gauge::default();
        r.register(
            "connections_open",
            "gRPC connections open (admitted; refused ones are not counted)",
            connections_open.clone(),
        );
        let connections_refused = Family::default();
        r.register(
            "connections_refused",
            "gRPC connections refused, by the cap they were over \
             (max_connections, max_connections_per_client)",
            connections_refused.clone(),
        );
        let connections_closed_idle = Counter::default();
        r.register(
            "connections_closed_idle",
            "gRPC connections closed with a GOAWAY after server.connection_idle_timeout without a call",
            connections_closed_idle.clone(),
        );
        let inner = Inner {
            connections_open,
            connections_refused,
            connections_closed_idle,
            disk: OnceLock::new(),
            registry: r,
            backend,
            store_requests,
            store_duration,
            admitted,
            queued,
            rejected,
            cut,
            reclaimed,
            reclaimed_bytes,
            wait,
            reserved,
            in_flight,
            received,
            sent,
            duration,
            requests,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Marks `backend` as the blob store in use.
    pub fn set_backend(&self, backend: crate::config::Backend) {
        self.inner
            .backend
            .get_or_create(&BackendLabel {
                backend: backend.as_str(),
            })
            .set(1);
    }

    /// Shows `disk` (the local store's budget, if the store has one) at each
    /// scrape. The first call wins.
    pub fn watch_disk(&self, disk: Option<DiskSpace>) {
        if let Some(disk) = disk {
            let _ = self.inner.disk.set(disk);
        }
    }

    /// A call began. `method` comes from [`method_label`].
    pub fn request_started(&self, method: &'static str) {
        self.inner
            .in_flight
            .get_or_create(&MethodLabel { method })
            .inc();
    }

    /// A call that [`Metrics::request_started`] counted ended, with `code`
    /// (`None`: the client went away before a status was sent).
    pub fn request_finished(
        &self,
        method: &'static str,
        code: impl Into<Option<Code>>,
        bytes_in: u64,
        bytes_out: u64,
        duration: Duration,
    ) {
        let i = &self.inner;
        let m = MethodLabel { method };
        i.in_flight.get_or_create(&m).dec();
        i.received.get_or_create(&m).inc_by(bytes_in);
        i.sent.get_or_create(&m).inc_by(bytes_out);
        let mc = MethodCode {
            method,
            code: code_label(code.into()),
        };
        i.duration
            .get_or_create(&mc)
            .observe(duration.as_secs_f64());
        i.requests.get_or_create(&mc).inc();
    }

    /// Only the families kept here, without the guard's.
    #[cfg(test)]
    fn encode_own(&self) -> String {
        let mut out = String::new();
        text::encode_registry(&mut out, &self.inner.registry).unwrap();
        out
    }

    /// The whole exposition: the counters kept here, then what `guard` shows now.
    /// Serve it with [`CONTENT_TYPE`].
    pub fn encode(&self, guard: &Guard) -> String {
        let now = scrape::registry(guard);
        let disk = self.inner.disk.get().map(disk_registry);
        let mut out = String::with_capacity(16 * 1024);
        text::encode_registry(&mut out, &self.inner.registry)
            .and_then(|()| text::encode_registry(&mut out, &now))
            .and_then(|()| match &disk {
                Some(d) => text::encode_registry(&mut out, d),
                None => Ok(()),
            })
            .and_then(|()| text::encode_eof(&mut out))
            .expect("writing to a String cannot fail");
        out
    }
}

/// The data volume as the local store's admission sees it now. A failed
/// reading leaves the families out (and says so in the log) rather than
/// showing a 0 that would look like a full disk.
fn disk_registry(disk: &DiskSpace) -> Registry {
    use prometheus_client::metrics::gauge::ConstGauge;
    let mut r = Registry::with_prefix(PREFIX);
    let reading = match disk.reading() {
        Ok(reading) => reading,
        Err(e) => {
            tracing::warn!(error = %e, "reading the data volume's free space failed");
            return r;
        }
    };
    for (name, help, value) in [
        (
            "storage_free",
            "Free space on the data volume (local backend), for unprivileged writers",
            reading.free,
        ),
        (
            "storage_capacity",
            "Size of the data volume (local backend)",
            reading.capacity,
        ),
        (
            "storage_min_free",
            "storage.min_free_space: free space uploads must leave on the data volume",
            reading.floor,
        ),
        (
            "storage_reserved",
            "Disk space reserved by uploads in progress and not yet written",
            reading.reserved,
        ),
        (
            "storage_admittable",
            "Largest upload (bytes still to write) the data volume admits now: free minus the floor and unpreallocated reservations",
            reading.admittable(),
        ),
    ] {
        r.register_with_unit(name, help, Unit::Bytes, ConstGauge::new(value));
    }
    r
}

impl AdmissionObserver for Metrics {
    fn admitted(&self, method: &'static str, bytes: u64, waited: Option<Duration>) {
        let m = MethodLabel { method };
        self.inner.admitted.get_or_create(&m).inc();
        self.inner.reserved.get_or_create(&m).inc_by(bytes);
        if let Some(w) = waited {
            self.inner.wait.get_or_create(&m).observe(w.as_secs_f64());
        }
    }

    fn queued(&self, method: &'static str) {
        self.inner
            .queued
            .get_or_create(&MethodLabel { method })
            .inc();
    }

    fn rejected(&self, method: &'static str, reason: &'static str) {
        let labels = MethodReason { method, reason };
        self.inner.rejected.get_or_create(&labels).inc();
    }

    fn stream_cut(&self, method: &'static str, reason: &'static str) {
        let labels = MethodReason { method, reason };
        self.inner.cut.get_or_create(&labels).inc();
    }

    fn reclaimed(&self, method: &'static str, reason: &'static str, bytes: u64) {
        let labels = MethodReason { method, reason };
        self.inner.reclaimed.get_or_create(&labels).inc();
        self.inner
            .reclaimed_bytes
            .get_or_create(&labels)
            .inc_by(bytes);
    }
}

impl crate::server::TransportObserver for Metrics {
    fn connection_opened(&self) {
        self.inner.connections_open.inc();
    }

    fn connection_closed(&self) {
        self.inner.connections_open.dec();
    }

    fn connection_refused(&self, reason: &'static str) {
        self.inner
            .connections_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    fn connection_closed_idle(&self) {
        self.inner.connections_closed_idle.inc();
    }
}

/// The `method` label of a request path: memgate's own methods by name, the
/// health and reflection services as one label each, anything else "other".
pub fn method_label(path: &str) -> &'static str {
    const KNOWN: [&str; 4] = [
        "/google.bytestream.ByteStream/Read",
        "/google.bytestream.ByteStream/Write",
        "/google.bytestream.ByteStream/QueryWriteStatus",
        "/memgate.v1.Payload/Process",
    ];
    if let Some(known) = KNOWN.into_iter().find(|k| *k == path) {
        known
    } else if path.starts_with("/grpc.health.v1.Health/") {
        "/grpc.health.v1.Health"
    } else if path.starts_with("/grpc.reflection.") {
        "reflection"
    } else {
        "other"
    }
}

/// gRPC's status code names, in lower case. A call without a status is one
/// whose client went away: gRPC calls that CANCELLED too.
fn code_label(code: Option<Code>) -> &'static str {
    match code {
        None | Some(Code::Cancelled) => "cancelled",
        Some(Code::Ok) => "ok",
        Some(Code::Unknown) => "unknown",
        Some(Code::InvalidArgument) => "invalid_argument",
        Some(Code::DeadlineExceeded) => "deadline_exceeded",
        Some(Code::NotFound) => "not_found",
        Some(Code::AlreadyExists) => "already_exists",
        Some(Code::PermissionDenied) => "permission_denied",
        Some(Code::ResourceExhausted) => "resource_exhausted",
        Some(Code::FailedPrecondition) => "failed_precondition",
        Some(Code::Aborted) => "aborted",
        Some(Code::OutOfRange) => "out_of_range",
        Some(Code::Unimplemented) => "unimplemented",
        Some(Code::Internal) => "internal",
        Some(Code::Unavailable) => "unavailable",
        Some(Code::DataLoss) => "data_loss",
        Some(Code::Unauthenticated) => "unauthenticated",
    }
}

impl crate::store::RequestObserver for Metrics {
    fn object_store_request(&self, op: &'static str, outcome: &'static str, elapsed: Duration) {
        let i = &self.inner;
        i.store_requests
            .get_or_create(&OpOutcome { op, outcome })
            .inc();
        i.store_duration
            .get_or_create(&OpLabel { op })
            .observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        for (path, label) in [
            (
                "/google.bytestream.ByteStream/Write",
                "/google.bytestream.ByteStream/Write",
            ),
            (
                "/google.bytestream.ByteStream/Read",
                "/google.bytestream.ByteStream/Read",
            ),
            (
                "/google.bytestream.ByteStream/QueryWriteStatus",
                "/google.bytestream.ByteStream/QueryWriteStatus",
            ),
            ("/memgate.v1.Payload/Process", "/memgate.v1.Payload/Process"),
            ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health"),
            ("/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health"),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                "reflection",
            ),
            ("/grpc.reflection.v1alpha.ServerReflection/X", "reflection"),
            ("/google.bytestream.ByteStream/Delete", "other"),
            ("/google.bytestream.ByteStream/Write/blobs/ab/1", "other"),
            ("/grpc.health.v1.Healthz/Check", "other"),
            ("", "other"),
            ("/", "other"),
        ] {
            assert_eq!(method_label(path), label, "{path}");
        }
    }

    #[test]
    fn code_labels() {
        assert_eq!(code_label(None), "cancelled");
        assert_eq!(code_label(Some(Code::Cancelled)), "cancelled");
        assert_eq!(code_label(Some(Code::Ok)), "ok");
        assert_eq!(
            code_label(Some(Code::ResourceExhausted)),
            "resource_exhausted"
        );
    }

    #[test]
    fn observer_calls_move_their_counters() {
        let m = Metrics::new();
        let write = MethodLabel {
            method: "/google.bytestream.ByteStream/Write",
        };
        m.queued(write.method);
        m.admitted(write.method, 1000, Some(Duration::from_millis(3)));
        m.admitted(write.method, 24, None);
        m.rejected(write.method, "queue_full");
        m.stream_cut(write.method, "request_idle");
        let i = &m.inner;
        assert_eq!(i.queued.get_or_create(&write).get(), 1);
        assert_eq!(i.admitted.get_or_create(&write).get(), 2);
        assert_eq!(i.reserved.get_or_create(&write).get(), 1024);
        let full = MethodReason {
            method: write.method,
            reason: "queue_full",
        };
        assert_eq!(i.rejected.get_or_create(&full).get(), 1);
        let idle = MethodReason {
            method: write.method,
            reason: "request_idle",
        };
        assert_eq!(i.cut.get_or_create(&idle).get(), 1);
        // Another method's counters did not move.
        let read = MethodLabel {
            method: "/google.bytestream.ByteStream/Read",
        };
        assert!(i.admitted.get(&read).is_none());
    }

    #[test]
    fn connection_events_move_their_counters() {
        use crate::server::TransportObserver;
        let m = Metrics::new();
        m.connection_opened();
        m.connection_opened();
        m.connection_closed();
        m.connection_refused("max_connections_per_client");
        m.connection_closed_idle();
        let text = m.encode_own();
        for line in [
            "memgate_connections_open 1",
            "memgate_connections_refused_total{reason=\"max_connections_per_client\"} 1",
            "memgate_connections_closed_idle_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn a_finished_request_leaves_flight_and_is_counted() {
        let m = Metrics::new();
        let method = method_label("/memgate.v1.Payload/Process");
        m.request_started(method);
        m.request_started(method);
        let ml = MethodLabel { method };
        assert_eq!(m.inner.in_flight.get_or_create(&ml).get(), 2);
        m.request_finished(method, Code::Ok, 10, 20, Duration::from_millis(5));
        m.request_finished(method, None, 1, 0, Duration::from_secs(1));
        let i = &m.inner;
        assert_eq!(i.in_flight.get_or_create(&ml).get(), 0);
        assert_eq!(i.received.get_or_create(&ml).get(), 11);
        assert_eq!(i.sent.get_or_create(&ml).get(), 20);
        for code in ["ok", "cancelled"] {
            let mc = MethodCode { method, code };
            assert_eq!(i.requests.get_or_create(&mc).get(), 1, "{code}");
        }
    }
}
