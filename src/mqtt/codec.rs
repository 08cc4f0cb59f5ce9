//! Packet framing on top of `rumqttd::protocol`: which protocol version a client speaks, reading
//! and writing packets on a connection, and the QoS 1 publishes the edge sends itself (the
//! codec's `Publish` cannot be built with QoS 1 outside rumqttd).

use std::{cell::RefCell, future::Future, pin::Pin, task::Poll, time::Duration};

use bytes::{BufMut, BytesMut};
use rumqttd::protocol::{self, v4::V4, v5::V5, Packet, Protocol};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Any byte stream a client connects over (plain TCP or TLS).
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("keep-alive or connect timeout")]
    Timeout,
    #[error("malformed packet: {0:?}")]
    Protocol(protocol::Error),
    #[error("the first packet is not CONNECT")]
    NotConnect,
    #[error("unsupported protocol level {0}")]
    Level(u8),
}

/// Bytes read from a socket in one call at most.
const SCRATCH_BYTES: usize = 16 * 1024;

thread_local! {
    /// Where every connection served by this thread reads into; what a read brings is then
    /// appended to the connection's own buffer. A connection waiting for bytes (an idle
    /// device, most of the time) so holds no read buffer at all.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

pub struct Conn {
    stream: Box<dyn Stream>,
    /// Bytes read and not decoded yet; empty (no allocation) between packets.
    read: BytesMut,
    write: BytesMut,
    pub version: Version,
    max_packet: usize,
}

/// The protocol level in a CONNECT's variable header, once enough bytes are there.
fn connect_level(buf: &[u8]) -> Result<Option<u8>, ConnError> {
    // Fixed header: type byte, then 1-4 bytes of remaining length.
    let mut i = 1;
    loop {
        let Some(b) = buf.get(i) else {
            return Ok(None);
        };
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err(ConnError::Protocol(
                protocol::Error::MalformedRemainingLength,
            ));
        }
    }
    let (Some(hi), Some(lo)) = (buf.get(i), buf.get(i + 1)) else {
        return Ok(None);
    };
    let name_len = u16::from_be_bytes([*hi, *lo]) as usize;
    Ok(buf.get(i + 2 + name_len).copied())
}

impl Conn {
    pub fn new(stream: Box<dyn Stream>, max_packet: usize) -> Conn {
        Conn {
            stream,
            read: BytesMut::new(),
            write: BytesMut::new(),
            version: Version::V4,
            max_packet,
        }
    }

    /// Waits for bytes and appends them to the read buffer. Cancel-safe: a read either
    /// completed within one poll or did not happen.
    async fn fill(&mut self) -> Result<(), ConnError> {
        let read = std::future::poll_fn(|cx| {
            SCRATCH.with_borrow_mut(|scratch| {
                let mut buf = ReadBuf::new(scratch);
                match Pin::new(&mut self.stream).poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) => {
                        self.read.extend_from_slice(buf.filled());
                        Poll::Ready(Ok(buf.filled().len()))
                    }
                    Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
                    Poll::Pending => Poll::Pending,
                }
            })
        })
        .await?;
        match read {
            0 => Err(ConnError::Closed),
            _ => Ok(()),
        }
    }

    /// Reads the CONNECT packet and picks the codec from its protocol level.
    pub async fn read_connect(&mut self, within: Duration) -> Result<Packet, ConnError> {
        tokio::time::timeout(within, async {
            loop {
                if self.read.first().is_some_and(|b| b >> 4 != 1) {
                    return Err(ConnError::NotConnect);
                }
                if let Some(level) = connect_level(&self.read)? {
                    self.version = match level {
                        4 => Version::V4,
                        5 => Version::V5,
                        other => return Err(ConnError::Level(other)),
                    };
                    if let Some(packet) = self.try_decode()? {
                        return Ok(packet);
                    }
                }
                self.fill().await?;
            }
        })
        .await
        .map_err(|_| ConnError::Timeout)?
    }

    fn try_decode(&mut self) -> Result<Option<Packet>, ConnError> {
        let decoded = match self.version {
            Version::V4 => V4.read_mut(&mut self.read, self.max_packet),
            Version::V5 => V5.read_mut(&mut self.read, self.max_packet),
        };
        match decoded {
            Ok(packet) => Ok(Some(packet)),
            Err(protocol::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(ConnError::Protocol(e)),
        }
    }

    /// Reads one packet; `idle` bounds the wait for the next bytes (keep-alive). Cancel-safe:
    /// bytes read before a cancellation stay buffered.
    pub async fn read_packet(&mut self, idle: Duration) -> Result<Packet, ConnError> {
        loop {
            if let Some(packet) = self.try_decode()? {
                return Ok(packet);
            }
            tokio::time::timeout(idle, self.fill())
                .await
                .map_err(|_| ConnError::Timeout)??;
        }
    }

    /// Waits for more bytes, at most `idle` (keep-alive).
    pub async fn fill_within(&mut self, idle: Duration) -> Result<(), ConnError> {
        tokio::time::timeout(idle, self.fill())
            .await
            .map_err(|_| ConnError::Timeout)?
    }

    /// Whether the next buffered packet (complete or not) is a PUBLISH.
    pub fn publish_buffered(&self) -> bool {
        self.read.first().is_some_and(|b| b >> 4 == 3)
    }

    /// A packet decoded from what is already buffered, without waiting.
    pub fn next_buffered(&mut self) -> Result<Option<Packet>, ConnError> {
        self.try_decode()
    }

    pub fn queue(&mut self, packet: Packet) -> Result<(), ConnError> {
        let written = match self.version {
            Version::V4 => V4.write(packet, &mut self.write),
            Version::V5 => V5.write(packet, &mut self.write),
        };
        written.map(|_| ()).map_err(ConnError::Protocol)
    }

    /// Queues a QoS 1 publish.
    pub fn queue_publish(&mut self, topic: &str, payload: &[u8], pkid: u16) {
        metrics::counter!("ozone_mqtt_messages_total", "direction" => "out").increment(1);
        let properties = usize::from(self.version == Version::V5);
        let remaining = 2 + topic.len() + 2 + properties + payload.len();
        let w = &mut self.write;
        w.reserve(remaining + 5);
        w.put_u8(0b0011_0010);
        let mut len = remaining;
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            w.put_u8(byte);
            if len == 0 {
                break;
            }
        }
        w.put_u16(topic.len() as u16);
        w.put_slice(topic.as_bytes());
        w.put_u16(pkid);
        if properties == 1 {
            w.put_u8(0);
        }
        w.put_slice(payload);
    }

    pub async fn flush(&mut self) -> Result<(), ConnError> {
        if !self.write.is_empty() {
            self.stream.write_all(&self.write).await?;
            self.write.clear();
            if self.write.capacity() > 64 * 1024 {
                self.write = BytesMut::new();
            }
        }
        Ok(())
    }

    pub async fn send_raw(&mut self, raw: &[u8]) -> Result<(), ConnError> {
        self.stream.write_all(raw).await?;
        Ok(())
    }

    /// Queues the packet at once and writes it out when awaited (the future does not hold
    /// the packet: connection futures stay small).
    pub fn send(&mut self, packet: Packet) -> impl Future<Output = Result<(), ConnError>> + '_ {
        let queued = self.queue(packet);
        async move {
            queued?;
            self.flush().await
        }
    }

    /// Gives back the buffers once everything read is decoded and everything queued is
    /// written, so that a connection between packets holds no buffer memory.
    pub fn shrink(&mut self) {
        if self.read.is_empty() && self.read.capacity() > 0 {
            self.read = BytesMut::new();
        }
        if self.write.is_empty() && self.write.capacity() > 0 {
            self.write = BytesMut::new();
        }
    }

    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}
