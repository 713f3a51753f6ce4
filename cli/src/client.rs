//! A small HTTP/1.1 client for the control socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use volumed_api::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach volumed at {socket}: {source} (is the daemon running? see --socket)")]
    Connect {
        socket: String,
        source: std::io::Error,
    },
    /// The daemon refused the request; its message names object and reason.
    #[error("{}", .0.error.message)]
    Api(ErrorBody),
    #[error("talking to volumed: {0}")]
    Http(String),
}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: PathBuf) -> Self {
        Client { socket }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(method, path, Some(body)).await
    }

    /// DELETE, answered with 204 and no body.
    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.raw(Method::DELETE, path, Bytes::new())
            .await
            .map(|_| ())
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let bytes = match body {
            Some(b) => {
                Bytes::from(serde_json::to_vec(b).map_err(|e| ClientError::Http(e.to_string()))?)
            }
            None => Bytes::new(),
        };
        let resp = self.raw(method, path, bytes).await?;
        serde_json::from_slice(&resp)
            .map_err(|e| ClientError::Http(format!("unexpected answer: {e}")))
    }

    async fn raw(&self, method: Method, path: &str, body: Bytes) -> Result<Bytes, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.display().to_string(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "volumed")
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(err) => Err(ClientError::Api(err)),
            Err(_) => Err(ClientError::Http(format!(
                "HTTP {} {}",
                status.as_u16(),
                status_text(status)
            ))),
        }
    }
}

fn status_text(s: StatusCode) -> &'static str {
    s.canonical_reason().unwrap_or("")
}
