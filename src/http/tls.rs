//! HTTPS without a reverse proxy: a TLS acceptor (rustls with the ring provider) for
//! `https_addr`, serving the same routes as `http_addr`. The certificate and key are PEM files
//! (`tls_cert`, `tls_key`) read again on SIGHUP, so a renewed certificate needs no restart;
//! connections already open keep the one they started with.
//!
//! The handshake runs in the connection's own task (on first read or write), never in the
//! accept loop, so one slow client cannot hold up others; it must finish within
//! `HANDSHAKE_TIMEOUT`.

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use poem::{
    http::uri::Scheme,
    listener::{Acceptor, TcpAcceptor},
    web::{LocalAddr, RemoteAddr},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::{
    rustls::{
        self,
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
        ServerConfig,
    },
    server::TlsStream,
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The certificate in force; replaced as a whole on reload.
#[derive(Clone)]
pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    config: Arc<RwLock<Arc<ServerConfig>>>,
}

impl TlsFiles {
    /// Reads and checks the certificate chain and key; errors name the file at fault.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<TlsFiles> {
        let config = server_config(cert, key)?;
        Ok(TlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            config: Arc::new(RwLock::new(Arc::new(config))),
        })
    }

    /// Reads the files again; on error the certificate in force stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let config = server_config(&self.cert, &self.key)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        Ok(())
    }

    fn current(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reloads on every SIGHUP until `stop` changes. The handler is in place when this
    /// returns (a SIGHUP before it would end the process).
    pub fn spawn_reloader(
        &self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let files = self.clone();
        #[cfg(unix)]
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        tokio::spawn(async move {
            #[cfg(unix)]
            {
                let mut hangups = match hangups {
                    Ok(h) => h,
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot listen for SIGHUP; TLS files are not reloaded");
                        return;
                    }
                };
                loop {
                    tokio::select! {
                        _ = hangups.recv() => match files.reload() {
                            Ok(()) => tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded"),
                            Err(err) => tracing::error!(error = %format!("{err:#}"), "TLS reload failed; the previous certificate stays in force"),
                        },
                        _ = stop.changed() => break,
                    }
                }
            }
            #[cfg(not(unix))]
            {
                let _ = (files, stop.changed().await);
            }
        })
    }
}

fn server_config(cert: &Path, key: &Path) -> anyhow::Result<ServerConfig> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read the certificate {}", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "{} holds no PEM certificate",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read the private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not fit together")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

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
        let acceptor = tokio_rustls::TlsAcceptor::from(self.files.current());
        let handshake = Box::pin(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(result) => result,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                )),
            }
        });
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
