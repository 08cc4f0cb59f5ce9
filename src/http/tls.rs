//! HTTPS without a reverse proxy: a poem acceptor for `https_addr` serving the same routes as
//! `http_addr`, with the certificate of [`crate::tls::TlsFiles`] (PEM files `tls_cert` and
//! `tls_key`, read again on SIGHUP).
//!
//! The handshake runs in the connection's own task (on first read or write), never in the
//! accept loop, so one slow client cannot hold up others; it must finish within
//! `tls_handshake_timeout_ms`.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
};

use poem::{
    http::uri::Scheme,
    listener::{Acceptor, TcpAcceptor},
    web::{LocalAddr, RemoteAddr},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;

use crate::tls::TlsFiles;

/// The application protocols HTTPS offers.
pub const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Accepts TCP connections and hands them over as TLS streams whose handshake is still to come.
pub struct TlsAcceptor {
    tcp: TcpAcceptor,
    files: TlsFiles,
}

impl TlsAcceptor {
    pub fn new(tcp: TcpAcceptor, files: TlsFiles) -> Self {
        TlsAcceptor { tcp, files }
    }
}

impl Acceptor for TlsAcceptor {
    type Io = LazyTls;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.tcp.local_addr()
    }

    async fn accept(&mut self) -> io::Result<(LazyTls, LocalAddr, RemoteAddr, Scheme)> {
        let (stream, local, remote, _) = self.tcp.accept().await?;
        let handshake = Box::pin(self.files.handshake(stream));
        Ok((
            LazyTls::Handshaking(handshake),
            local,
            remote,
            Scheme::HTTPS,
        ))
    }
}

type Handshake = Pin<Box<dyn Future<Output = io::Result<TlsStream<tokio::net::TcpStream>>> + Send>>;

/// A TLS stream that completes its handshake on first use.
pub enum LazyTls {
    Handshaking(Handshake),
    Ready(Box<TlsStream<tokio::net::TcpStream>>),
    Failed,
}

impl LazyTls {
    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<&mut TlsStream<tokio::net::TcpStream>>> {
        if let LazyTls::Handshaking(handshake) = self {
            match handshake.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(stream)) => *self = LazyTls::Ready(Box::new(stream)),
                Poll::Ready(Err(err)) => {
                    *self = LazyTls::Failed;
                    tracing::debug!(error = %err, "TLS handshake failed");
                    return Poll::Ready(Err(err));
                }
            }
        }
        match self {
            LazyTls::Ready(stream) => Poll::Ready(Ok(stream)),
            _ => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "TLS handshake failed",
            ))),
        }
    }
}

impl AsyncRead for LazyTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_ready(cx) {
            Poll::Ready(Ok(stream)) => Pin::new(stream).poll_read(cx, buf),
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for LazyTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_ready(cx) {
            Poll::Ready(Ok(stream)) => Pin::new(stream).poll_write(cx, buf),
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_ready(cx) {
            Poll::Ready(Ok(stream)) => Pin::new(stream).poll_flush(cx),
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LazyTls::Ready(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
            _ => Poll::Ready(Ok(())),
        }
    }
}
