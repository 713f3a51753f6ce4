//! Refused NBD connections in the log: why each was turned away
//! ([`Reason`]), and at most one line per reason per second with the count
//! of those left out, so a flood of refusals never becomes a flood of
//! lines. Hitting the connection cap is the operator's problem (WARN); the
//! rest are the client's (INFO).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reason {
    ConnectionLimit,
    HandshakeTimeout,
    TlsRequired,
    TlsHandshake,
    UnknownExport,
}

impl Reason {
    const ALL: [Reason; 5] = [
        Reason::ConnectionLimit,
        Reason::HandshakeTimeout,
        Reason::TlsRequired,
        Reason::TlsHandshake,
        Reason::UnknownExport,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Reason::ConnectionLimit => "connection limit reached",
            Reason::HandshakeTimeout => "handshake timed out",
            Reason::TlsRequired => "TLS required",
            Reason::TlsHandshake => "TLS handshake failed",
            Reason::UnknownExport => "unknown export",
        }
    }
}

/// Refused connections in the log: a flood of them must not become a flood
/// of lines, so each reason logs at most once per [`RefusalLog::INTERVAL`]
/// and the next line (or the periodic flush) says how many were left out.
#[derive(Default)]
pub(super) struct RefusalLog {
    limits: [RateLimit; Reason::ALL.len()],
}

impl RefusalLog {
    pub(super) const INTERVAL: Duration = Duration::from_secs(1);

    pub(super) fn refused(&self, reason: Reason, peer: &str, detail: &str) {
        let Some(suppressed) = self.limits[reason as usize].admit(Instant::now(), Self::INTERVAL)
        else {
            return;
        };
        // Hitting the cap is the operator's problem, the rest the client's.
        let limit = reason == Reason::ConnectionLimit;
        let reason = reason.as_str();
        if limit {
            warn!(%peer, reason, detail, suppressed, "NBD connection refused");
        } else {
            info!(%peer, reason, detail, suppressed, "NBD connection refused");
        }
    }

    /// Reports the refusals left out since each reason's last line, once
    /// that line is an interval old, so a burst's count is not held back
    /// until the next refusal.
    pub(super) fn flush(&self, now: Instant) {
        for reason in Reason::ALL {
            if let Some(n) = self.limits[reason as usize].take_suppressed(now, Self::INTERVAL) {
                let limit = reason == Reason::ConnectionLimit;
                let reason = reason.as_str();
                if limit {
                    warn!(
                        reason,
                        suppressed = n,
                        "NBD connections refused without a line each"
                    );
                } else {
                    info!(
                        reason,
                        suppressed = n,
                        "NBD connections refused without a line each"
                    );
                }
            }
        }
    }
}

/// One line per interval; events in between are counted.
#[derive(Default)]
struct RateLimit(Mutex<RateState>);

#[derive(Default)]
struct RateState {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// `Some(events left out before this one)` if this event gets a line.
    fn admit(&self, now: Instant, interval: Duration) -> Option<u64> {
        // A panic while holding it cannot leave the counter inconsistent.
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match st.last {
            Some(t) if now.saturating_duration_since(t) < interval => {
                st.suppressed = st.suppressed.saturating_add(1);
                None
            }
            _ => {
                st.last = Some(now);
                Some(std::mem::take(&mut st.suppressed))
            }
        }
    }

    /// The count left out, if any and the last line is an interval old;
    /// reporting it counts as a line.
    fn take_suppressed(&self, now: Instant, interval: Duration) -> Option<u64> {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let due = st
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= interval);
        if st.suppressed == 0 || !due {
            return None;
        }
        st.last = Some(now);
        Some(std::mem::take(&mut st.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let r = RateLimit::default();
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        assert_eq!(r.admit(t0, s), Some(0));
        for i in 1..=5 {
            assert_eq!(r.admit(t0 + Duration::from_millis(i * 100), s), None);
        }
        // Not due yet: the last line is younger than the interval.
        assert_eq!(r.take_suppressed(t0 + Duration::from_millis(900), s), None);
        assert_eq!(r.admit(t0 + s, s), Some(5));
        assert_eq!(r.admit(t0 + s, s), None);
        assert_eq!(r.take_suppressed(t0 + 2 * s, s), Some(1));
        assert_eq!(r.take_suppressed(t0 + 3 * s, s), None);
        // The flush counted as a line.
        assert_eq!(r.admit(t0 + 2 * s + Duration::from_millis(1), s), None);
        assert_eq!(r.admit(t0 + 3 * s, s), Some(1));
    }
}
