//! A one-line `\r` spinner on stderr, drawn only when stderr is a terminal,
//! and [`wait_for`], which polls until a condition holds or a timeout.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const FRAMES: [char; 4] = ['|', '/', '-', '\\'];

/// A spinner with a message. Silent when disabled.
#[derive(Debug)]
pub struct Spinner {
    enabled: bool,
    frame: usize,
    width: usize,
}

impl Spinner {
    /// A spinner that draws only when stderr is a terminal.
    pub fn stderr() -> Self {
        Self::new(std::io::stderr().is_terminal())
    }

    /// A spinner that draws when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            frame: 0,
            width: 0,
        }
    }

    /// The line for the next frame: `\r<frame> <message>` padded with
    /// spaces over the previous, longer line.
    pub fn next_line(&mut self, message: &str) -> String {
        let text = format!("{} {message}", FRAMES[self.frame % FRAMES.len()]);
        self.frame += 1;
        let len = text.chars().count();
        let pad = self.width.saturating_sub(len);
        self.width = len;
        format!("\r{text}{}", " ".repeat(pad))
    }

    /// Draws the next frame.
    pub fn tick(&mut self, message: &str) {
        if self.enabled {
            let line = self.next_line(message);
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(line.as_bytes());
            let _ = err.flush();
        }
    }

    /// Erases the spinner line.
    pub fn clear(&mut self) {
        if self.enabled && self.width > 0 {
            let _ = write!(std::io::stderr(), "\r{}\r", " ".repeat(self.width));
            self.width = 0;
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The condition was not reached in time.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {}s waiting for {what} (last seen: {last})", timeout.as_secs())]
pub struct WaitTimeout {
    /// What was awaited, e.g. `i-1 to be running`.
    pub what: String,
    /// The last observed status.
    pub last: String,
    /// The timeout.
    pub timeout: Duration,
}

/// What one poll saw.
#[derive(Debug)]
pub enum Poll<T> {
    /// Done, with the final value.
    Ready(T),
    /// Not yet; the status to show.
    Pending(String),
}

/// Calls `poll` every `interval` until it is ready, an error or `timeout`,
/// ticking `spinner` with `what` and the last status.
pub async fn wait_for<T, E, F, Fut>(
    spinner: &mut Spinner,
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut poll: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Poll<T>, E>>,
    E: From<WaitTimeout>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match poll().await {
            Ok(Poll::Ready(v)) => {
                spinner.clear();
                return Ok(v);
            }
            Ok(Poll::Pending(status)) => status,
            Err(e) => {
                spinner.clear();
                return Err(e);
            }
        };
        if Instant::now() >= deadline {
            spinner.clear();
            return Err(WaitTimeout {
                what: what.to_string(),
                last,
                timeout,
            }
            .into());
        }
        spinner.tick(&format!("waiting for {what} ({last})"));
        tokio::time::sleep(interval.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_rotate_and_overwrite_longer_lines() {
        let mut s = Spinner::new(false);
        assert_eq!(s.next_line("pending long"), "\r| pending long");
        assert_eq!(s.next_line("run"), "\r/ run         ");
        assert_eq!(s.next_line("x"), "\r- x  ");
        assert_eq!(s.next_line("x"), "\r\\ x");
        assert_eq!(s.next_line("x"), "\r| x");
    }

    #[derive(Debug, PartialEq)]
    enum E {
        Timeout(String),
        Other,
    }
    impl From<WaitTimeout> for E {
        fn from(t: WaitTimeout) -> Self {
            E::Timeout(t.to_string())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn wait_returns_once_ready() {
        let mut n = 0;
        let mut s = Spinner::new(false);
        let v: Result<u32, E> = wait_for(
            &mut s,
            "x",
            Duration::from_secs(10),
            Duration::from_millis(100),
            || {
                n += 1;
                let k = n;
                async move {
                    Ok(if k == 3 {
                        Poll::Ready(k)
                    } else {
                        Poll::Pending("p".into())
                    })
                }
            },
        )
        .await;
        assert_eq!(v, Ok(3));
    }

    #[tokio::test(start_paused = true)]
    async fn wait_times_out_with_the_last_status() {
        let mut s = Spinner::new(false);
        let v: Result<(), E> = wait_for(
            &mut s,
            "i-1 to be running",
            Duration::from_secs(1),
            Duration::from_millis(300),
            || async { Ok(Poll::Pending("pending".into())) },
        )
        .await;
        assert_eq!(
            v,
            Err(E::Timeout(
                "timed out after 1s waiting for i-1 to be running (last seen: pending)".into()
            ))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn wait_stops_on_error() {
        let mut s = Spinner::new(false);
        let v: Result<(), E> = wait_for(
            &mut s,
            "x",
            Duration::from_secs(1),
            Duration::from_millis(300),
            || async { Err(E::Other) },
        )
        .await;
        assert_eq!(v, Err(E::Other));
    }
}
