//! Frames over a blocking TCP stream: the thin I/O shell around
//! [`crate::wire`], shared by the primary and the replicas.

use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;

use crate::wire::{self, Frame, WireError, HEADER_LEN};

/// Errors moving frames.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket failed, timed out or closed.
    #[error("connection failed")]
    Io(#[from] io::Error),
    /// The peer sent bytes that are not a frame.
    #[error("bad frame from peer")]
    Wire(#[from] WireError),
    /// A header said a frame was complete but it did not decode as one
    /// (a bug in the framing, never the peer's input alone).
    #[error("frame incomplete after its announced length")]
    Incomplete,
}

/// A connection that reads and writes whole frames.
#[derive(Debug)]
pub struct Link {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    buf: Vec<u8>,
    /// Frames queued to send.
    out: Vec<u8>,
}

impl Link {
    /// Wraps a connected stream (with `TCP_NODELAY`: every frame is a
    /// request or an answer someone waits for).
    pub fn new(stream: TcpStream) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        let writer = stream.try_clone()?;
        Ok(Link {
            reader: BufReader::with_capacity(256 << 10, stream),
            writer,
            buf: Vec::new(),
            out: Vec::new(),
        })
    }

    /// The underlying stream (for timeouts and shutdown).
    pub fn stream(&self) -> &TcpStream {
        &self.writer
    }

    /// Sends bytes already encoded by [`wire::encode`].
    pub fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// Encodes and sends `frame`.
    pub fn send(&mut self, frame: &Frame) -> Result<(), LinkError> {
        let bytes = wire::encode(frame)?;
        Ok(self.send_bytes(&bytes)?)
    }

    /// Encodes `frame` for the next [`Link::send_queued`].
    pub fn queue(&mut self, frame: &Frame) -> Result<(), LinkError> {
        self.out.extend_from_slice(&wire::encode(frame)?);
        Ok(())
    }

    /// Sends the frames queued, in one write.
    pub fn send_queued(&mut self) -> io::Result<()> {
        let sent = self.writer.write_all(&self.out);
        self.out.clear();
        sent
    }

    /// True when a whole frame is already read in, so [`Link::recv`] will
    /// not block (a peer that sent several frames without waiting).
    pub fn frame_buffered(&self) -> bool {
        let buf = self.reader.buffer();
        matches!(wire::frame_len(buf), Ok(Some(n)) if n <= buf.len())
    }

    /// Reads the next frame; `Ok(None)` when the peer closed cleanly between
    /// frames.
    pub fn recv(&mut self) -> Result<Option<Frame>, LinkError> {
        self.buf.clear();
        // The fixed header, then the volume id (its length is byte 7).
        self.buf.resize(8, 0);
        match self.reader.read_exact(&mut self.buf) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            r => r?,
        }
        wire::frame_len(&self.buf)?;
        let header = HEADER_LEN + usize::from(self.buf[7]);
        self.fill(header)?;
        let total = wire::frame_len(&self.buf)?.ok_or(LinkError::Incomplete)?;
        self.fill(total)?;
        match wire::decode(&self.buf)? {
            Some((frame, _)) => Ok(Some(frame)),
            None => Err(LinkError::Incomplete),
        }
    }

    /// Reads until the buffer holds `n` bytes.
    fn fill(&mut self, n: usize) -> io::Result<()> {
        let have = self.buf.len();
        if n > have {
            self.buf.resize(n, 0);
            self.reader.read_exact(&mut self.buf[have..])?;
        }
        Ok(())
    }
}
