//! Handlers of imports, exports and jobs: `POST /v1/imports` (a file),
//! `POST /v1/imports/stream` (raw bytes in the body), the job list, one job,
//! its NDJSON event stream, and cancel.

use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use volumed_api::{ErrorCode, ImportRequest, Job, JobList};

use super::state::{ApiFailure, ApiResult, ApiState, body};
use crate::images::registry::JobHandle;
use crate::present::views;

/// The header carrying a stream import's request (the body is the bytes).
pub const IMPORT_HEADER: &str = "x-volumed-import";
/// Fastest rate of progress events on a job's stream.
const EVENT_INTERVAL: Duration = Duration::from_millis(250);
/// An event is sent at least this often, changed or not.
const EVENT_HEARTBEAT: Duration = Duration::from_secs(5);

pub async fn import_file(State(s): State<ApiState>, bytes: Bytes) -> ApiResult<impl IntoResponse> {
    let req: ImportRequest = body(&bytes, None)?;
    let h = s.images.import(req).await?;
    Ok((StatusCode::ACCEPTED, Json(views::job(&h))))
}

/// Streams the body into a new volume and answers when the job has ended:
/// the job if it completed, its error otherwise.
pub async fn import_stream(
    State(s): State<ApiState>,
    headers: HeaderMap,
    data: Body,
) -> ApiResult<Json<Job>> {
    let raw = headers
        .get(IMPORT_HEADER)
        .ok_or_else(|| {
            ApiFailure::new(
                ErrorCode::InvalidRequest,
                format!("a stream import takes its request as JSON in the {IMPORT_HEADER} header"),
            )
        })?
        .as_bytes();
    let req: ImportRequest = body(&Bytes::copy_from_slice(raw), None)?;
    let (h, task) = s.images.import_stream(req, data.into_data_stream()).await?;
    let _ = task.await;
    let job = views::job(&h);
    match job.state {
        volumed_api::JobState::Completed => Ok(Json(job)),
        _ => Err(ApiFailure::new(
            ErrorCode::InvalidRequest,
            format!(
                "import {} {}: {}",
                job.id,
                job.state.as_str(),
                job.error.as_deref().unwrap_or("stopped")
            ),
        )),
    }
}

pub async fn list_jobs(State(s): State<ApiState>) -> Json<JobList> {
    Json(JobList {
        jobs: s.images.jobs().iter().map(|h| views::job(h)).collect(),
    })
}

pub async fn get_job(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    let h = s.images.job(&id)?;
    Ok(Json(views::job(&h)))
}

pub async fn cancel_job(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    let h = s.images.cancel_job(&id)?;
    Ok(Json(views::job(&h)))
}

/// One JSON line per change (at most every 250 ms, at least every 5 s),
/// ending with the line of the job's final state.
pub async fn job_events(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<Response> {
    let h = s.images.job(&id)?;
    let rx = h.subscribe();
    // Ends at shutdown too, so the API's graceful stop is not held by a
    // job that will resume at the next start.
    let stop = s.images.jobs_stopping();
    let stream = futures_util::stream::unfold((h, rx, false), move |(h, mut rx, ended)| {
        let stop = stop.clone();
        async move {
            if ended || stop.is_cancelled() {
                return None;
            }
            let job = views::job(&h);
            let last = job.state.is_final();
            let mut line = serde_json::to_vec(&job).expect("a Job always serializes");
            line.push(b'\n');
            if !last {
                tokio::select! {
                    () = next_event(&h, &mut rx) => {}
                    () = stop.cancelled() => {}
                }
            }
            Some((Ok::<_, std::io::Error>(Bytes::from(line)), (h, rx, last)))
        }
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Waits until the next line is due: a change seen and [`EVENT_INTERVAL`]
/// passed since the last line, the job ended (at once: a waiting `vol`
/// exits as soon as it can), or [`EVENT_HEARTBEAT`] without a change.
async fn next_event(h: &JobHandle, rx: &mut tokio::sync::watch::Receiver<u64>) {
    let now = tokio::time::Instant::now();
    let (due, heartbeat) = (now + EVENT_INTERVAL, now + EVENT_HEARTBEAT);
    let mut changed = false;
    loop {
        let wake = if changed { due } else { heartbeat };
        match tokio::time::timeout_at(wake, rx.changed()).await {
            Ok(Ok(())) => {
                changed = true;
                if h.is_final() {
                    return;
                }
            }
            // Due, or the heartbeat; or the job is gone.
            Err(_) | Ok(Err(_)) => return,
        }
    }
}

/// `POST /v1/exports`: 202 and the job, or for destination `-` the raw
/// bytes as the answer's body (the job's id in `x-volumed-job`).
pub async fn export(
    State(s): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<super::server::Peer>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let req: volumed_api::ExportRequest = body(&bytes, None)?;
    let (h, rx) = s.images.export_image(req, peer.0).await?;
    let Some(rx) = rx else {
        return Ok((StatusCode::ACCEPTED, Json(views::job(&h))).into_response());
    };
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|r| (r.map(Bytes::from), rx))
    });
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_owned(),
            ),
            (
                axum::http::HeaderName::from_static("x-volumed-job"),
                h.id().to_string(),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
