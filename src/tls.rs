//! TLS for the listeners that speak it (HTTPS and MQTTS): the certificate chain and key in
//! force, read from PEM files and read again on SIGHUP (connections already open keep the one
//! they started with), and a server handshake bounded in time. Transports run the handshake in
//! each connection's own task, never in their accept loop, so a client that stalls or sends
//! garbage holds up nobody else.

use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use tokio::net::TcpStream;
use tokio_rustls::{
    rustls::{
        self,
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
        ServerConfig,
    },
    server::TlsStream,
};

/// The certificate in force for one listener; replaced as a whole on reload.
#[derive(Clone)]
pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    /// ALPN protocols the listener offers (none: no ALPN).
    alpn: Vec<Vec<u8>>,
    handshake_timeout: Duration,
    config: Arc<RwLock<Arc<ServerConfig>>>,
}

impl TlsFiles {
    /// Reads and checks the certificate chain and key; errors name the file at fault.
    pub fn load(
        cert: &Path,
        key: &Path,
        alpn: &[&[u8]],
        handshake_timeout: Duration,
    ) -> anyhow::Result<TlsFiles> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let config = server_config(cert, key, &alpn)?;
        Ok(TlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            alpn,
            handshake_timeout,
            config: Arc::new(RwLock::new(Arc::new(config))),
        })
    }

    /// Reads the files again; on error the certificate in force stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let config = server_config(&self.cert, &self.key, &self.alpn)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        Ok(())
    }

    fn current(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The server side of a handshake with the certificate in force now, failing with
    /// `TimedOut` when the client has not finished it within the handshake timeout. Await it
    /// in the connection's own task.
    pub fn handshake(
        &self,
        stream: TcpStream,
    ) -> impl Future<Output = io::Result<TlsStream<TcpStream>>> + Send + 'static {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current());
        let limit = self.handshake_timeout;
        async move {
            match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                Ok(result) => result,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                )),
            }
        }
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

fn server_config(cert: &Path, key: &Path, alpn: &[Vec<u8>]) -> anyhow::Result<ServerConfig> {
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
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}
