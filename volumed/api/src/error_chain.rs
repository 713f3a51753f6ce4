//! The one way an error is shown to a person: its message, then each
//! source's, joined by ": ", each once. The daemon answers the control API
//! with it and writes job and snapshot errors with it; `vol` prints its own
//! errors with it. Errors of this workspace never print their source in
//! their own message, so the chain holds each cause once; a foreign error
//! that does (its message already ends with its source's) is not repeated.

use std::error::Error;

/// `error` and its sources as one line.
pub fn error_chain(error: &(dyn Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let msg = e.to_string();
        if !msg.is_empty() && !out.ends_with(&msg) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&msg);
        }
        next = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("flush volume 'a'")]
    struct Flush(#[source] std::io::Error);

    /// A foreign error that prints its source too.
    #[derive(Debug, thiserror::Error)]
    #[error("read: {0}")]
    struct Loud(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("catalog")]
    struct Outer(#[source] Loud);

    #[test]
    fn each_cause_once() {
        let eio = || std::io::Error::from_raw_os_error(5);
        assert_eq!(
            error_chain(&Flush(eio())),
            "flush volume 'a': Input/output error (os error 5)"
        );
        assert_eq!(
            error_chain(&Outer(Loud(eio()))),
            "catalog: read: Input/output error (os error 5)"
        );
        assert_eq!(error_chain(&eio()), "Input/output error (os error 5)");
    }
}
