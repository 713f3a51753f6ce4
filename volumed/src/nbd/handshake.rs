//! Fixed-newstyle negotiation: greeting, client flags, then options until
//! the client picks an export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or leaves.
//!
//! It finds exports through [`ExportLookup`], two lookups and nothing else
//! of the engine, so it can be tested with a fake.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::proto::{self, *};
use super::tls::Tls;
use crate::engine::Export;

/// What the handshake needs to know about exports.
pub trait ExportLookup: Send + Sync {
    /// The export of this name, if it exists and may be served now.
    fn export(&self, name: &str) -> Option<Export>;
    /// Every export a client may see, for NBD_OPT_LIST.
    fn export_names(&self) -> Vec<String>;
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

/// The flags for a session; DF exists only with structured replies.
pub fn transmission_flags(structured: bool) -> u16 {
    if structured {
        BASE_FLAGS | FLAG_SEND_DF
    } else {
        BASE_FLAGS
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Proto(#[from] ProtoError),
    #[error("i/o: {0}")]
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
    /// base:allocation; contexts apply only to that export.
    meta_export: Option<String>,
    /// The last refusal, reported if the client leaves after it.
    refused: Option<Refused>,
}

impl State {
    fn options_for(&self, export: &str) -> SessionOptions {
        SessionOptions {
            structured: self.structured,
            base_allocation: self.structured && self.meta_export.as_deref() == Some(export),
            read_only: false,
        }
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
                let size = export.volume.size();
                let options = st.options_for(&name);
                let flags = transmission_flags(options.structured);
                stream
                    .write_all(&encode_export_name_reply(size, flags, client.no_zeroes))
                    .await?;
                stream.flush().await?;
                return Ok(Negotiated::Export {
                    export,
                    size,
                    options,
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
                let size = export.volume.size();
                let options = st.options_for(&req.name);
                let flags = transmission_flags(options.structured);
                out.clear();
                encode_option_reply(&mut out, opt.option, REP_INFO, &info_export(size, flags));
                // Sent whether or not it was asked for: the minimum of 1 means
                // any alignment works, so no client is constrained by it.
                let preferred = u32::try_from(export.volume.chunk_size).unwrap_or(u32::MAX);
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
                    let desc = format!("volumed volume {}", export.volume.name);
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

/// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. The one context
/// is `base:allocation`; LIST also answers the namespace query `base:` and
/// an empty query list with it.
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
    if exports.export(&req.name).is_none() {
        return reply(
            stream,
            out,
            option,
            REP_ERR_UNKNOWN,
            unknown_export(&req.name).as_bytes(),
        )
        .await;
    }
    let set = option == OPT_SET_META_CONTEXT;
    let selected = if set {
        req.queries.iter().any(|q| q == META_BASE_ALLOCATION)
    } else {
        req.queries.is_empty()
            || req
                .queries
                .iter()
                .any(|q| q == META_BASE_ALLOCATION || q == "base:")
    };
    if set {
        // SET replaces whatever an earlier SET selected.
        st.meta_export = selected.then(|| req.name.clone());
    }
    out.clear();
    if selected {
        // LIST replies carry id 0, as the spec reserves.
        let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
        encode_option_reply(
            out,
            option,
            REP_META_CONTEXT,
            &meta_context_data(id, META_BASE_ALLOCATION),
        );
    }
    encode_option_reply(out, option, REP_ACK, &[]);
    send(stream, out).await
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
    proto::encode_option_reply(out, option, rep, data);
    send(stream, out).await
}
