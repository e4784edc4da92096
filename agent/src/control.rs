//! Client of ferro-vmm's JSON-lines control socket (`docs/vmm-control.md`).

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Errors talking to a VMM.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Connecting, writing or reading failed.
    #[error("control socket I/O failed")]
    Io(#[from] std::io::Error),
    /// The VMM closed the connection without answering.
    #[error("the VMM closed the control connection without answering")]
    Closed,
    /// The answer is not the expected JSON.
    #[error("unreadable control answer")]
    Json(#[from] serde_json::Error),
    /// The VMM refused the request.
    #[error("the VMM refused: {0}")]
    Refused(String),
    /// No answer in time.
    #[error("no control answer in time")]
    Timeout,
}

/// One answer line.
#[derive(Debug, Deserialize)]
pub struct Answer {
    /// Success.
    pub ok: bool,
    /// The VM's state.
    #[serde(default)]
    pub state: Option<String>,
    /// Whether a shutdown was graceful.
    #[serde(default)]
    pub graceful: Option<bool>,
    /// The error of a failed request.
    #[serde(default)]
    pub error: Option<String>,
}

/// Send one request line and read the answer, within `timeout`.
pub async fn request(socket: &Path, line: &str, timeout: Duration) -> Result<Answer, ControlError> {
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await?;
        stream.write_all(format!("{line}\n").as_bytes()).await?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).await?;
        if answer.is_empty() {
            return Err(ControlError::Closed);
        }
        let a: Answer = serde_json::from_str(&answer)?;
        if a.ok {
            Ok(a)
        } else {
            Err(ControlError::Refused(a.error.unwrap_or_default()))
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ControlError::Timeout)?
}

/// `{"op":"status"}`.
pub async fn status(socket: &Path) -> Result<Answer, ControlError> {
    request(socket, r#"{"op":"status"}"#, Duration::from_secs(2)).await
}

/// `{"op":"shutdown"}`: Ctrl-Alt-Del, then a hard stop after `timeout_ms`.
pub async fn shutdown(socket: &Path, timeout_ms: u32) -> Result<Answer, ControlError> {
    let line = format!(r#"{{"op":"shutdown","timeout_ms":{timeout_ms}}}"#);
    let wait = Duration::from_millis(u64::from(timeout_ms)) + Duration::from_secs(3);
    request(socket, &line, wait).await
}
