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
    /// The cause sits inside the sentence, before the hint, so it is part
    /// of the message and not a source the chain would print again.
    #[error("cannot reach volumed at {socket}: {cause} (is the daemon running? see --socket)")]
    Connect {
        socket: String,
        cause: std::io::Error,
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

    /// POST with a streamed body and one extra header; answered with JSON.
    pub async fn post_stream<B, T>(
        &self,
        path: &str,
        header: (&str, String),
        body: B,
    ) -> Result<T, ClientError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        T: DeserializeOwned,
    {
        let resp = self
            .request(
                Method::POST,
                path,
                Some(header),
                "application/octet-stream",
                body,
            )
            .await?;
        serde_json::from_slice(&resp)
            .map_err(|e| ClientError::Http(format!("unexpected answer: {e}")))
    }

    async fn raw(&self, method: Method, path: &str, body: Bytes) -> Result<Bytes, ClientError> {
        self.request(method, path, None, "application/json", Full::new(body))
            .await
    }

    /// POSTs JSON and hands the answer's body to `sink` as it arrives (a
    /// download); an error answer is returned as usual.
    pub async fn download<T: Serialize>(
        &self,
        path: &str,
        body: &T,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), ClientError> {
        let bytes =
            Bytes::from(serde_json::to_vec(body).map_err(|e| ClientError::Http(e.to_string()))?);
        self.stream(Method::POST, path, bytes, &mut sink).await
    }

    /// GETs a streamed answer (NDJSON events) and hands it to `sink` as it
    /// arrives.
    pub async fn get_stream(
        &self,
        path: &str,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), ClientError> {
        self.stream(Method::GET, path, Bytes::new(), &mut sink)
            .await
    }

    async fn stream(
        &self,
        method: Method,
        path: &str,
        bytes: Bytes,
        sink: &mut impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), ClientError> {
        let resp = self
            .response(method, path, None, "application/json", Full::new(bytes))
            .await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?
                .to_bytes();
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(err) => ClientError::Api(err),
                Err(_) => ClientError::Http(format!("HTTP {}", status.as_u16())),
            });
        }
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| ClientError::Http(format!("the stream broke off: {e}")))?;
            if let Some(data) = frame.data_ref() {
                sink(data).map_err(|e| ClientError::Http(format!("write: {e}")))?;
            }
        }
        Ok(())
    }

    async fn response<B>(
        &self,
        method: Method,
        path: &str,
        header: Option<(&str, String)>,
        content_type: &str,
        body: B,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|cause| ClientError::Connect {
                    socket: self.socket.display().to_string(),
                    cause,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "volumed")
            .header("content-type", content_type);
        if let Some((k, v)) = header {
            req = req.header(k, v);
        }
        let req = req
            .body(body)
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        Ok(resp)
    }

    async fn request<B>(
        &self,
        method: Method,
        path: &str,
        header: Option<(&str, String)>,
        content_type: &str,
        body: B,
    ) -> Result<Bytes, ClientError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let resp = self
            .response(method, path, header, content_type, body)
            .await?;
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
