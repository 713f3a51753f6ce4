//! Fixed-newstyle negotiation: greeting, client flags, then options until
//! the client picks an export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or leaves.
//!
//! It finds exports through [`ExportLookup`], two lookups and nothing else
//! of the engine, so it can be tested with a fake.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use nbd_proto::*;
use snapshot::diff::Diff;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::engine::Export;
use crate::tls::Tls;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the handshake needs to know about exports.
pub trait ExportLookup: Send + Sync {
    /// The export of this name, if it exists and may be served now.
    fn export(&self, name: &str) -> Option<Export>;
    /// Every export a client may see, for NBD_OPT_LIST.
    fn export_names(&self) -> Vec<String>;
    /// The dirty bitmap of `export` against `from` (a snapshot id, or
    /// `LAST` on a volume: its last completed snapshot); `None` if there
    /// is no such bitmap.
    fn changed_since<'a>(
        &'a self,
        _export: &'a Export,
        _from: &'a str,
    ) -> BoxFuture<'a, Option<MetaContext>> {
        Box::pin(async { None })
    }
    /// What `export` has dirty bitmaps against (snapshot ids, or `LAST`),
    /// for a namespace query of NBD_OPT_LIST_META_CONTEXT.
    fn changed_candidates<'a>(&'a self, _export: &'a Export) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async { Vec::new() })
    }
}

/// A metadata context selected for a session, with what it answers from.
#[derive(Clone)]
pub enum MetaContext {
    BaseAllocation,
    /// Bit 0 set on the ranges that changed since a snapshot.
    Changed(Arc<Diff>),
    /// A live volume's chunks changed since its last completed snapshot,
    /// read from its dirty set at each request.
    LiveChanged,
}

/// Options longer than this are refused: the longest valid one (NBD_OPT_GO
/// with a 4096-byte name and every info type) is far shorter.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// Up to this many bytes of an oversized option are read and discarded so the
/// client gets NBD_REP_ERR_TOO_BIG; more than that is treated as abuse and
/// the connection is closed.
const MAX_DRAIN_LEN: u32 = 16 << 20;

/// Transmission flags of every export.
/// CAN_MULTI_CONN holds because all connections share one set of file
/// descriptors, so one FLUSH's sync covers every completed write.
/// FAST_ZERO holds because every zeroing is a fallocate, never a write loop.
const BASE_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_SEND_CACHE
    | FLAG_SEND_FAST_ZERO
    | FLAG_CAN_MULTI_CONN;

/// Transmission flags of a read-only export (a snapshot): no command that
/// changes data is offered; FLUSH is, and is a no-op, since clients issue
/// it at the end of any session.
const READ_ONLY_FLAGS: u16 =
    FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_CACHE | FLAG_CAN_MULTI_CONN;

/// The flags for a session; DF exists only with structured replies.
pub fn transmission_flags(structured: bool, read_only: bool) -> u16 {
    let base = if read_only {
        READ_ONLY_FLAGS
    } else {
        BASE_FLAGS
    };
    if structured {
        base | FLAG_SEND_DF
    } else {
        base
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("i/o")]
    Io(#[from] std::io::Error),
    #[error("option {option} of {length} bytes is too long")]
    OptionTooLong { option: u32, length: u32 },
    #[error("export {0:?} not found (NBD_OPT_EXPORT_NAME cannot report errors)")]
    UnknownExportName(String),
    #[error("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only listener")]
    ExportNameWithoutTls,
    #[error("TLS is required and the client did not agree to fixed newstyle")]
    TlsWithoutFixedNewstyle,
}

impl HandshakeError {
    /// The refusal this error is, when the server turned the client away
    /// rather than the client breaking the protocol.
    pub fn refused(&self) -> Option<Refused> {
        match self {
            HandshakeError::UnknownExportName(name) => Some(Refused::UnknownExport(name.clone())),
            HandshakeError::ExportNameWithoutTls | HandshakeError::TlsWithoutFixedNewstyle => {
                Some(Refused::TlsRequired)
            }
            _ => None,
        }
    }
}

/// Why a client was turned away during negotiation, so the server can say
/// so in its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// TLS is required and the client asked for something else first.
    TlsRequired,
    /// The export named does not exist or is not attached.
    UnknownExport(String),
}

/// What negotiation ended with.
pub enum Negotiated {
    /// The client entered transmission on this export; `size` is the one it
    /// was told and must keep for the whole session.
    Export {
        export: Export,
        size: u64,
        options: SessionOptions,
        /// The metadata contexts selected, by the ids the client was given.
        contexts: Vec<(u32, MetaContext)>,
    },
    /// STARTTLS was acknowledged: the caller runs the TLS handshake, then
    /// resumes with [`options`] on the encrypted stream.
    StartTls(ClientFlags),
    /// The client aborted or left during option haggling.
    Closed,
    /// The client left after the server refused what it asked for, and
    /// nothing it asked afterwards succeeded.
    Refused(Refused),
}

/// Option-haggling state of one connection.
#[derive(Default)]
struct State {
    structured: bool,
    /// The export named by the last NBD_OPT_SET_META_CONTEXT that selected
    /// any context; contexts apply only to that export.
    meta_export: Option<String>,
    /// What that SET selected.
    contexts: Vec<(u32, MetaContext)>,
    /// The last refusal, reported if the client leaves after it.
    refused: Option<Refused>,
}

impl State {
    fn session_for(
        &self,
        name: &str,
        export: &Export,
    ) -> (SessionOptions, Vec<(u32, MetaContext)>) {
        let contexts = if self.structured && self.meta_export.as_deref() == Some(name) {
            self.contexts.clone()
        } else {
            Vec::new()
        };
        let options = SessionOptions {
            structured: self.structured,
            block_status: !contexts.is_empty(),
            read_only: export.backend.read_only(),
        };
        (options, contexts)
    }
}

/// Greeting, client flags, then option haggling under the `tls` mode.
pub async fn negotiate<S>(
    stream: &mut S,
    exports: &dyn ExportLookup,
    tls: Tls,
) -> Result<Negotiated, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&encode_greeting()).await?;
    stream.flush().await?;
    let client = parse_client_flags(stream.read_u32().await?)?;
    if tls == Tls::Required && !client.fixed_newstyle {
        return Err(HandshakeError::TlsWithoutFixedNewstyle);
    }
    options(stream, exports, client, tls).await
}

/// Option haggling until the client picks an export, upgrades to TLS or
/// leaves. Runs again after STARTTLS with fresh state: nothing agreed in
/// plaintext carries over into the encrypted session.
pub async fn options<S>(
    stream: &mut S,
    exports: &dyn ExportLookup,
    client: ClientFlags,
    tls: Tls,
) -> Result<Negotiated, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut st = State::default();
    match haggle(stream, exports, client, tls, &mut st).await {
        Ok(Negotiated::Closed) => Ok(match st.refused {
            Some(r) => Negotiated::Refused(r),
            None => Negotiated::Closed,
        }),
        other => other,
    }
}

async fn haggle<S>(
    stream: &mut S,
    exports: &dyn ExportLookup,
    client: ClientFlags,
    tls: Tls,
    st: &mut State,
) -> Result<Negotiated, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = Vec::new();
    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        if let Err(e) = stream.read_exact(&mut hdr).await {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                return Ok(Negotiated::Closed);
            }
            return Err(e.into());
        }
        let opt = OptionHeader::parse(&hdr)?;
        if opt.length > MAX_OPTION_LEN {
            if opt.option == OPT_EXPORT_NAME || opt.length > MAX_DRAIN_LEN {
                return Err(HandshakeError::OptionTooLong {
                    option: opt.option,
                    length: opt.length,
                });
            }
            let mut sink = stream.take(u64::from(opt.length));
            tokio::io::copy(&mut sink, &mut tokio::io::sink()).await?;
            reply(
                stream,
                &mut out,
                opt.option,
                REP_ERR_TOO_BIG,
                b"option data too long",
            )
            .await?;
            continue;
        }
        let mut data = vec![0u8; opt.length as usize];
        stream.read_exact(&mut data).await?;

        if tls == Tls::Required {
            // FORCEDTLS: nothing but STARTTLS and ABORT before the upgrade,
            // not even the list of exports.
            match opt.option {
                OPT_STARTTLS | OPT_ABORT => {}
                OPT_EXPORT_NAME => return Err(HandshakeError::ExportNameWithoutTls),
                other => {
                    st.refused = Some(Refused::TlsRequired);
                    reply(
                        stream,
                        &mut out,
                        other,
                        REP_ERR_TLS_REQD,
                        b"TLS is required: send NBD_OPT_STARTTLS first",
                    )
                    .await?;
                    continue;
                }
            }
        }

        match opt.option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = exports.export(&name) else {
                    return Err(HandshakeError::UnknownExportName(name));
                };
                let size = export.backend.size();
                let (options, contexts) = st.session_for(&name, &export);
                let flags = transmission_flags(options.structured, options.read_only);
                stream
                    .write_all(&encode_export_name_reply(size, flags, client.no_zeroes))
                    .await?;
                stream.flush().await?;
                return Ok(Negotiated::Export {
                    export,
                    size,
                    options,
                    contexts,
                });
            }
            OPT_ABORT => {
                // The client may already have closed; the ACK is a courtesy.
                let _ = reply(stream, &mut out, opt.option, REP_ACK, &[]).await;
                return Ok(Negotiated::Closed);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(
                        stream,
                        &mut out,
                        opt.option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_LIST takes no data",
                    )
                    .await?;
                    continue;
                }
                out.clear();
                for name in exports.export_names() {
                    encode_option_reply(&mut out, opt.option, REP_SERVER, &rep_server_data(&name));
                }
                encode_option_reply(&mut out, opt.option, REP_ACK, &[]);
                send(stream, &out).await?;
            }
            OPT_INFO | OPT_GO => {
                let req = match parse_info_request(&data) {
                    Ok(r) => r,
                    Err(msg) => {
                        reply(
                            stream,
                            &mut out,
                            opt.option,
                            REP_ERR_INVALID,
                            msg.as_bytes(),
                        )
                        .await?;
                        continue;
                    }
                };
                let Some(export) = exports.export(&req.name) else {
                    st.refused = Some(Refused::UnknownExport(req.name.clone()));
                    let msg = unknown_export(&req.name);
                    reply(
                        stream,
                        &mut out,
                        opt.option,
                        REP_ERR_UNKNOWN,
                        msg.as_bytes(),
                    )
                    .await?;
                    continue;
                };
                let size = export.backend.size();
                let (options, contexts) = st.session_for(&req.name, &export);
                let flags = transmission_flags(options.structured, options.read_only);
                out.clear();
                encode_option_reply(&mut out, opt.option, REP_INFO, &info_export(size, flags));
                // Sent whether or not it was asked for: the minimum of 1 means
                // any alignment works, so no client is constrained by it.
                let preferred = u32::try_from(export.backend.chunk_size()).unwrap_or(u32::MAX);
                encode_option_reply(
                    &mut out,
                    opt.option,
                    REP_INFO,
                    &info_block_size(1, preferred, MAX_PAYLOAD),
                );
                if req.requests.contains(&INFO_NAME) {
                    encode_option_reply(
                        &mut out,
                        opt.option,
                        REP_INFO,
                        &info_string(INFO_NAME, &req.name),
                    );
                }
                if req.requests.contains(&INFO_DESCRIPTION) {
                    let desc = export.backend.description();
                    encode_option_reply(
                        &mut out,
                        opt.option,
                        REP_INFO,
                        &info_string(INFO_DESCRIPTION, &desc),
                    );
                }
                encode_option_reply(&mut out, opt.option, REP_ACK, &[]);
                send(stream, &out).await?;
                if opt.option == OPT_GO {
                    return Ok(Negotiated::Export {
                        export,
                        size,
                        options,
                        contexts,
                    });
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        stream,
                        &mut out,
                        opt.option,
                        REP_ERR_INVALID,
                        b"takes no data",
                    )
                    .await?;
                    continue;
                }
                st.structured = true;
                reply(stream, &mut out, opt.option, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(stream, &mut out, st, exports, opt.option, &data).await?;
            }
            OPT_STARTTLS => {
                let refusal: Option<(u32, &[u8])> = match tls {
                    Tls::Off => Some((REP_ERR_POLICY, b"TLS is not configured on this server")),
                    Tls::Active => Some((REP_ERR_INVALID, b"TLS is already active")),
                    Tls::Offered | Tls::Required if !data.is_empty() => {
                        Some((REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data"))
                    }
                    Tls::Offered | Tls::Required => None,
                };
                match refusal {
                    Some((rep, msg)) => reply(stream, &mut out, opt.option, rep, msg).await?,
                    None => {
                        reply(stream, &mut out, opt.option, REP_ACK, &[]).await?;
                        return Ok(Negotiated::StartTls(client));
                    }
                }
            }
            other => {
                debug!(option = other, "unsupported NBD option");
                reply(
                    stream,
                    &mut out,
                    other,
                    REP_ERR_UNSUP,
                    b"option not supported",
                )
                .await?;
            }
        }
    }
}

/// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. Contexts are
/// `base:allocation` and, on a snapshot export, one dirty bitmap per
/// snapshot it can be compared with, under `qemu:dirty-bitmap:FROM` and
/// `x-volumed:changed:FROM`. LIST also answers namespace queries (`base:`,
/// `qemu:`, `qemu:dirty-bitmap:`, `x-volumed:`, `x-volumed:changed:`) and an
/// empty query list with every context.
async fn meta_context<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut Vec<u8>,
    st: &mut State,
    exports: &dyn ExportLookup,
    option: u32,
    data: &[u8],
) -> std::io::Result<()> {
    if !st.structured {
        return reply(
            stream,
            out,
            option,
            REP_ERR_INVALID,
            b"negotiate structured replies first",
        )
        .await;
    }
    let req = match parse_meta_request(data) {
        Ok(r) => r,
        Err(msg) => return reply(stream, out, option, REP_ERR_INVALID, msg.as_bytes()).await,
    };
    let Some(export) = exports.export(&req.name) else {
        return reply(
            stream,
            out,
            option,
            REP_ERR_UNKNOWN,
            unknown_export(&req.name).as_bytes(),
        )
        .await;
    };
    let set = option == OPT_SET_META_CONTEXT;
    let everything = [
        META_BASE_ALLOCATION.to_owned(),
        META_QEMU_DIRTY_BITMAP.to_owned(),
        META_VOLUMED_CHANGED.to_owned(),
    ];
    let queries: &[String] = if !set && req.queries.is_empty() {
        &everything
    } else {
        &req.queries
    };
    let mut found: Vec<(String, Option<MetaContext>)> = Vec::new();
    let mut candidates: Option<Vec<String>> = None;
    for q in queries {
        if q == META_BASE_ALLOCATION || (!set && q == "base:") {
            found.push((
                META_BASE_ALLOCATION.to_owned(),
                Some(MetaContext::BaseAllocation),
            ));
            continue;
        }
        let Some((ns, from)) = changed_query(q, set) else {
            continue;
        };
        if from.is_empty() {
            // A namespace query (LIST only): every bitmap, none computed.
            if candidates.is_none() {
                candidates = Some(exports.changed_candidates(&export).await);
            }
            for c in candidates.iter().flatten() {
                found.push((format!("{ns}{c}"), None));
            }
        } else if let Some(ctx) = exports.changed_since(&export, from).await {
            found.push((format!("{ns}{from}"), Some(ctx)));
        }
    }
    let mut seen = std::collections::HashSet::new();
    found.retain(|(name, _)| seen.insert(name.clone()));
    out.clear();
    if set {
        // SET replaces whatever an earlier SET selected.
        let mut next = META_BASE_ALLOCATION_ID + 1;
        st.contexts.clear();
        for (name, ctx) in found {
            let Some(ctx) = ctx else { continue };
            let id = match ctx {
                MetaContext::BaseAllocation => META_BASE_ALLOCATION_ID,
                MetaContext::Changed(_) | MetaContext::LiveChanged => {
                    next += 1;
                    next - 1
                }
            };
            encode_option_reply(out, option, REP_META_CONTEXT, &meta_context_data(id, &name));
            st.contexts.push((id, ctx));
        }
        st.meta_export = (!st.contexts.is_empty()).then(|| req.name.clone());
    } else {
        // LIST replies carry id 0, as the spec reserves.
        for (name, _) in found {
            encode_option_reply(out, option, REP_META_CONTEXT, &meta_context_data(0, &name));
        }
    }
    encode_option_reply(out, option, REP_ACK, &[]);
    send(stream, out).await
}

/// A query in one of the changed-blocks namespaces: the namespace as it
/// prefixes a context name, and what follows it (empty: every bitmap).
/// `qemu:` and `x-volumed:` alone are namespace queries too, in LIST only.
fn changed_query(q: &str, set: bool) -> Option<(&'static str, &str)> {
    for ns in [META_QEMU_DIRTY_BITMAP, META_VOLUMED_CHANGED] {
        if let Some(rest) = q.strip_prefix(ns) {
            return (!set || !rest.is_empty()).then_some((ns, rest));
        }
        let leader = &ns[..ns.find(':').map_or(ns.len(), |i| i + 1)];
        if !set && q == leader {
            return Some((ns, ""));
        }
    }
    None
}

fn unknown_export(name: &str) -> String {
    let mut msg = format!("export '{name}' does not exist or is not attached");
    // The name is the client's; cut on a character boundary, never inside one.
    let mut end = msg.len().min(MAX_STRING);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    msg.truncate(end);
    msg
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

async fn reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut Vec<u8>,
    option: u32,
    rep: u32,
    data: &[u8],
) -> std::io::Result<()> {
    out.clear();
    encode_option_reply(out, option, rep, data);
    send(stream, out).await
}
