//! How much memory a call will need, decided from its path before its body is
//! read: a fixed window for streaming calls, the gRPC length prefix for unary ones;
//! and how much progress its streams must make to keep that memory.

use std::{collections::HashMap, time::Duration};

use super::watch::StreamLimits;

/// The estimate for one method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Estimate {
    /// Not guarded: health checks and reflection must answer under any pressure.
    Bypass,
    /// A fixed reservation: a streaming call's in-flight window.
    Fixed(u64),
    /// A streaming call that holds up to `messages` of its request messages at
    /// once besides the transport's `window`: it reserves `window + overhead +
    /// messages × first` up front (`first` covers small messages), and grows by
    /// `messages ×` the difference whenever a message larger than any before it
    /// arrives, read from its length prefix before tonic allocates it. A
    /// compressed message counts as `compressed` (what it may inflate to).
    Stream {
        window: u64,
        messages: u64,
        first: u64,
        overhead: u64,
        compressed: u64,
    },
    /// A unary call: `copies × declared length + overhead`, read from the 5-byte
    /// length prefix before tonic allocates the message. A compressed message
    /// reserves its declared (compressed) length plus `compressed`, the most it
    /// may decompress to.
    Unary {
        copies: u64,
        overhead: u64,
        compressed: u64,
    },
}

/// A method's metric label (bounded: never a resource name) and its estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub method: &'static str,
    pub estimate: Estimate,
}

/// Classifies calls by path (`/package.Service/Method`).
pub trait Estimator: Clone + Send + Sync + 'static {
    fn classify(&self, path: &str) -> Class;

    /// The progress every guarded call must make to keep its reservation.
    fn stream_limits(&self) -> StreamLimits {
        StreamLimits::OFF
    }
}

/// A table of methods, with bypassed service prefixes and a default for the rest.
#[derive(Debug, Clone)]
pub struct MethodTable {
    methods: HashMap<&'static str, Estimate>,
    bypass_prefixes: Vec<&'static str>,
    default: Estimate,
    limits: StreamLimits,
}

impl MethodTable {
    /// Health checking and reflection bypass the guard; unknown methods reserve `default`.
    pub fn new(default: Estimate) -> Self {
        Self {
            methods: HashMap::new(),
            bypass_prefixes: vec!["/grpc.health.v1.Health/", "/grpc.reflection."],
            default,
            limits: StreamLimits::OFF,
        }
    }

    /// Sets the progress guarded calls must make (bypassed ones are never cut).
    pub fn with_stream_limits(mut self, limits: StreamLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets the estimate of `path` (`/package.Service/Method`).
    pub fn method(mut self, path: &'static str, estimate: Estimate) -> Self {
        self.methods.insert(path, estimate);
        self
    }
}

impl Estimator for MethodTable {
    fn classify(&self, path: &str) -> Class {
        if let Some((k, e)) = self.methods.get_key_value(path) {
            return Class {
                method: k,
                estimate: *e,
            };
        }
        if let Some(p) = self.bypass_prefixes.iter().find(|p| path.starts_with(**p)) {
            return Class {
                method: p,
                estimate: Estimate::Bypass,
            };
        }
        Class {
            method: "other",
            estimate: self.default,
        }
    }

    fn stream_limits(&self) -> StreamLimits {
        self.limits
    }
}

/// The gRPC message prefix: compressed flag and declared length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub compressed: bool,
    pub len: u32,
}

/// Parses the 5-byte prefix (`flag`, big-endian `u32` length); `None` if too short.
pub fn parse_prefix(bytes: &[u8]) -> Option<Prefix> {
    let head: [u8; 5] = bytes.get(..5)?.try_into().ok()?;
    Some(Prefix {
        compressed: head[0] != 0,
        len: u32::from_be_bytes([head[1], head[2], head[3], head[4]]),
    })
}

impl Estimate {
    /// Bytes reserved when the call is admitted (for a unary call, before its
    /// prefix is read: see [`Estimate::for_prefix`]).
    pub fn upfront(&self) -> u64 {
        match *self {
            Estimate::Bypass => 0,
            Estimate::Fixed(n) => n,
            Estimate::Stream {
                window,
                messages,
                first,
                overhead,
                ..
            } => window + overhead + messages * first,
            Estimate::Unary { overhead, .. } => overhead,
        }
    }

    /// Bytes to reserve for a unary call with this prefix.
    pub fn for_prefix(copies: u64, overhead: u64, compressed: u64, p: Prefix) -> u64 {
        if p.compressed {
            compressed.saturating_add(p.len as u64)
        } else {
            copies.saturating_mul(p.len as u64).saturating_add(overhead)
        }
    }
}

/// Parses a `grpc-timeout` header value (`1-8 digits` + `H M S m u n`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    // ASCII first: the split below is by byte (a multi-byte unit panicked, found by fuzzing).
    if !v.is_ascii() || v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(
            parse_prefix(&[0, 0, 0, 1, 0]),
            Some(Prefix {
                compressed: false,
                len: 256
            })
        );
        assert_eq!(
            parse_prefix(&[1, 0x08, 0xf0, 0xd1, 0x80, 9, 9]),
            Some(Prefix {
                compressed: true,
                len: 0x08f0_d180
            })
        );
        assert_eq!(parse_prefix(&[0, 0, 0, 1]), None);
        let p = Prefix {
            compressed: false,
            len: 100,
        };
        assert_eq!(Estimate::for_prefix(2, 10, 999, p), 210);
        assert_eq!(
            Estimate::for_prefix(
                2,
                10,
                999,
                Prefix {
                    compressed: true,
                    ..p
                }
            ),
            1099
        );
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_grpc_timeout("120000m"),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        for bad in ["", "S", "5", "5s", "-5S", "123456789S", "1.5S", "5µ", "€"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn table() {
        let t = MethodTable::new(Estimate::Fixed(1)).method("/a.B/C", Estimate::Fixed(7));
        assert_eq!(
            t.classify("/a.B/C"),
            Class {
                method: "/a.B/C",
                estimate: Estimate::Fixed(7)
            }
        );
        assert_eq!(
            t.classify("/grpc.health.v1.Health/Check").estimate,
            Estimate::Bypass
        );
        assert_eq!(
            t.classify("/x.Y/Z"),
            Class {
                method: "other",
                estimate: Estimate::Fixed(1)
            }
        );
    }
}
