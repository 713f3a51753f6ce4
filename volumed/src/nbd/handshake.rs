//! Fixed-newstyle negotiation: greeting, client flags, then options until
//! the client picks an export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or leaves.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::proto::{self, *};
use crate::engine::{Engine, Export};

/// Options longer than this are refused: the longest valid one (NBD_OPT_GO
/// with a 4096-byte name and every info type) is far shorter.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// Up to this many bytes of an oversized option are read and discarded so the
/// client gets NBD_REP_ERR_TOO_BIG; more than that is treated as abuse and
/// the connection is closed.
const MAX_DRAIN_LEN: u32 = 16 << 20;

/// Largest request payload (READ or WRITE), as qemu's NBD server; requests
/// over it get an error, never a buffer of that size.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Transmission flags of every export.
/// CAN_MULTI_CONN holds because all connections share one set of file
/// descriptors, so one FLUSH's fdatasync covers every completed write.
pub const TRANSMISSION_FLAGS: u16 =
    FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN;

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
}

/// What negotiation ended with.
pub enum Negotiated {
    /// The client entered transmission on this export; `size` is the one it
    /// was told and must keep for the whole session.
    Export { export: Export, size: u64 },
    /// The client aborted or left during option haggling.
    Closed,
}

pub async fn negotiate<S>(stream: &mut S, engine: &Engine) -> Result<Negotiated, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&encode_greeting()).await?;
    stream.flush().await?;
    let client = parse_client_flags(stream.read_u32().await?)?;

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

        match opt.option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = engine.export(&name) else {
                    return Err(HandshakeError::UnknownExportName(name));
                };
                let size = export.volume.size();
                let bytes = encode_export_name_reply(size, TRANSMISSION_FLAGS, client.no_zeroes);
                stream.write_all(&bytes).await?;
                stream.flush().await?;
                return Ok(Negotiated::Export { export, size });
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
                for name in engine.export_names() {
                    encode_option_reply(
                        &mut out,
                        opt.option,
                        REP_SERVER,
                        &rep_server_data(name.as_str()),
                    );
                }
                encode_option_reply(&mut out, opt.option, REP_ACK, &[]);
                stream.write_all(&out).await?;
                stream.flush().await?;
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
                let Some(export) = engine.export(&req.name) else {
                    let msg = format!("export '{}' does not exist or is not attached", req.name);
                    reply(
                        stream,
                        &mut out,
                        opt.option,
                        REP_ERR_UNKNOWN,
                        truncate(&msg),
                    )
                    .await?;
                    continue;
                };
                let size = export.volume.size();
                out.clear();
                encode_option_reply(
                    &mut out,
                    opt.option,
                    REP_INFO,
                    &info_export(size, TRANSMISSION_FLAGS),
                );
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
                stream.write_all(&out).await?;
                stream.flush().await?;
                if opt.option == OPT_GO {
                    return Ok(Negotiated::Export { export, size });
                }
            }
            OPT_STARTTLS => {
                reply(
                    stream,
                    &mut out,
                    opt.option,
                    REP_ERR_POLICY,
                    b"TLS is not configured on this server",
                )
                .await?;
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

async fn reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut Vec<u8>,
    option: u32,
    rep: u32,
    data: &[u8],
) -> std::io::Result<()> {
    out.clear();
    proto::encode_option_reply(out, option, rep, data);
    stream.write_all(out).await?;
    stream.flush().await
}

fn truncate(s: &str) -> &[u8] {
    &s.as_bytes()[..s.len().min(MAX_STRING)]
}
