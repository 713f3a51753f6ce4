//! The AWS endpoint's HTTP/1.1 listener: plain TCP, or TLS with the same
//! rustls set-up as NBD. Each request's body is read whole (bounded: the
//! largest the APIs send is one 512 KiB block), its signature verified,
//! and only then is it routed to `ec2` or `ebs`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::attrs::Ec2Attributes;
use super::credentials::Credentials;
use super::{AwsConfig, AwsState, Refusal, Request, Response, Service, ebs, ec2, sigv4};
use crate::catalog::{Catalog, CatalogError};
use crate::present::NbdEndpoints;

/// A request body larger than this is refused: a 512 KiB block plus room.
pub const MAX_BODY: usize = 2 << 20;
/// Connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 256;
/// A client must send its request headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// ... and its body within this (a 512 KiB block at well under 10 KiB/s).
const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configure AWS endpoint TLS")]
    Tls(#[source] crate::tls::TlsError),
    #[error("bind AWS endpoint on {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("forget the EC2 attributes of deleted volumes")]
    Sweep(#[source] CatalogError),
}

pub struct AwsServer {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<AwsState>,
}

/// Binds the endpoint; `credentials` were loaded (and their file's mode
/// checked) first thing at start.
pub async fn bind(
    config: &AwsConfig,
    credentials: Credentials,
    machines: Arc<crate::machines::Machines>,
    lifecycle: Arc<crate::lifecycle::Lifecycle>,
    images: Arc<crate::images::Images>,
    catalog: Arc<Catalog>,
    endpoints: Arc<NbdEndpoints>,
) -> Result<AwsServer, StartError> {
    let engine = Arc::clone(machines.engine());
    let tls = config
        .tls
        .as_ref()
        .map(crate::tls::acceptor)
        .transpose()
        .map_err(StartError::Tls)?;
    let bind_err = |source| StartError::Bind {
        addr: config.listen,
        source,
    };
    let listener = TcpListener::bind(config.listen).await.map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    info!(keys = credentials.len(), region = %config.region, tls = tls.is_some(),
          %addr, "AWS endpoint listening");
    let attrs = Ec2Attributes::new(catalog);
    attrs.sweep().await.map_err(StartError::Sweep)?;
    Ok(AwsServer {
        listener,
        tls,
        state: Arc::new(AwsState {
            engine,
            machines,
            lifecycle,
            images,
            attrs,
            endpoints,
            credentials,
            region: config.region.clone(),
            ebs_tokens: ebs::write::Tokens::default(),
        }),
    })
}

impl AwsServer {
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` fires; connections then finish the request
    /// in progress and close.
    pub async fn run(self, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        {
            let state = Arc::clone(&self.state);
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                state
                    .attrs
                    .sweep_snapshots_every(&state.engine, &state.lifecycle, shutdown)
                    .await
            });
        }
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = Arc::clone(&slots).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        debug!(error = %e, "AWS endpoint accept failed");
                        continue;
                    }
                },
            };
            let state = Arc::clone(&self.state);
            let tls = self.tls.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tls {
                    None => serve_connection(tcp, state, shutdown).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => serve_connection(stream, state, shutdown).await,
                            Ok(Err(e)) => {
                                info!(%peer, error = %e, "AWS endpoint TLS handshake failed")
                            }
                            Err(_) => info!(%peer, "AWS endpoint TLS handshake timed out"),
                        }
                    }
                }
            });
        }
    }
}

async fn serve_connection<S>(io: S, state: Arc<AwsState>, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(handle(&state, req).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(error = %e, "AWS endpoint connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Answers one request, every answer (EC2 or EBS, success or error)
/// carrying its request id in `x-amzn-requestid`, where SDKs read it.
async fn handle(state: &AwsState, req: hyper::Request<Incoming>) -> Response {
    let request_id = super::request_id();
    let mut resp = route(state, req, request_id.clone()).await;
    if let Ok(v) = hyper::header::HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-amzn-requestid", v);
    }
    resp
}

/// Reads, authenticates and routes one request.
async fn route(state: &AwsState, req: hyper::Request<Incoming>, request_id: String) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    let service = Service::of(&path);
    // The body must arrive in time too: the header timeout does not cover it.
    let body =
        match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            _ => {
                return refuse(service, &request_id, Refusal::TooLarge);
            }
        };
    // hyper gives header names lowercase; a value that is not text cannot
    // be part of a valid signature, and is dropped.
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let body_sha256 = sigv4::sha256_hex(&body);
    // A block's bytes are checked against its signed checksum header.
    let allow_unsigned_payload =
        service == Service::Ebs && parts.method == hyper::Method::PUT && path.contains("/blocks/");
    let verified = sigv4::verify(
        &sigv4::Request {
            method: parts.method.as_str(),
            path: &path,
            query: &query,
            headers: &headers,
            body_sha256: &body_sha256,
            allow_unsigned_payload,
        },
        &state.credentials,
        &state.region,
        service.signing_name(),
        super::unix_now(),
    );
    let key = match verified {
        Ok(v) => v.credential.access_key_id.clone(),
        Err(e) => {
            info!(request_id, method = %parts.method, path, error = %e, "AWS request refused");
            return refuse(service, &request_id, Refusal::Auth(e));
        }
    };
    debug!(request_id, key, method = %parts.method, path, "AWS request");
    let req = Request {
        method: parts.method,
        path,
        query,
        headers,
        body,
        request_id,
    };
    match service {
        Service::Ec2 => ec2::handle(state, req).await,
        Service::Ebs => ebs::handle(state, req).await,
        Service::Rbin => super::rbin::handle(state, req).await,
        Service::Dlm => super::dlm::handle(state, req).await,
    }
}

/// Why a request was refused before reaching an API.
fn refuse(service: Service, request_id: &str, why: Refusal) -> Response {
    match service {
        Service::Ec2 => ec2::refusal(request_id, why),
        Service::Ebs | Service::Rbin | Service::Dlm => ebs::refusal(request_id, why),
    }
}
