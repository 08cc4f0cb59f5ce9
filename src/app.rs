//! Wiring: connects the database, starts the background workers and the HTTP listener, and
//! shuts them down in order.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use migration::MigratorTrait;
use poem::{
    listener::{Acceptor, AcceptorExt, Listener, TcpAcceptor, TcpListener},
    Server,
};
use tokio::{sync::watch, task::JoinHandle};

pub use crate::state::AppState;
use crate::{
    config::Settings,
    db::Db,
    domain::{auth::AuthKeys, commands, devices::TokenCache, events::Ingestor, notify::Notifier},
    http::{
        self,
        limits::Limits,
        staff::auth::LoginLimits,
        tls::{TlsAcceptor, ALPN},
    },
    mqtt,
    state::BrokerHealth,
    tls::TlsFiles,
};

pub struct Application {
    state: Arc<AppState>,
    acceptor: TcpAcceptor,
    http_addr: SocketAddr,
    ingest_task: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    checkpointer: JoinHandle<()>,
    housekeeper: JoinHandle<()>,
    upkeep: JoinHandle<()>,
    metrics_acceptor: Option<TcpAcceptor>,
    tls: Option<(TlsAcceptor, TlsFiles)>,
    https_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    stop_background: watch::Sender<bool>,
    broker: Option<mqtt::Broker>,
}

/// Opens the database and applies pending migrations.
pub async fn open_database(settings: &Settings) -> anyhow::Result<Db> {
    let db = Db::connect_with(&settings.database_url, &settings.db_options())
        .await
        .with_context(|| {
            format!(
                "cannot open database {}",
                crate::config::redact_url(&settings.database_url)
            )
        })?;
    migration::Migrator::up(db.conn(), None)
        .await
        .context("database migration failed")?;
    Ok(db)
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let limits = Limits::from_settings(&settings)?;
        let db = open_database(&settings).await?;
        let auth = AuthKeys::load(
            &db,
            settings.jwt_secret.as_deref(),
            chrono::Duration::seconds(settings.jwt_ttl_secs as i64),
        )
        .await
        .context("cannot load the JWT signing key")?;
        let acceptor = TcpListener::bind(settings.http_addr.clone())
            .into_acceptor()
            .await
            .with_context(|| format!("cannot listen on {}", settings.http_addr))?;
        let http_addr = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().copied())
            .context("HTTP listener has no address")?;
        let (metrics_acceptor, metrics_addr) = match &settings.metrics_addr {
            Some(addr) => {
                let acceptor = TcpListener::bind(addr.clone())
                    .into_acceptor()
                    .await
                    .with_context(|| format!("cannot listen on {addr} (metrics_addr)"))?;
                let bound = acceptor
                    .local_addr()
                    .first()
                    .and_then(|a| a.as_socket_addr().copied());
                (Some(acceptor), bound)
            }
            None => (None, None),
        };
        let (tls, https_addr) = match &settings.https_addr {
            Some(addr) => {
                let (Some(cert), Some(key)) = (&settings.tls_cert, &settings.tls_key) else {
                    anyhow::bail!("https_addr needs tls_cert and tls_key");
                };
                let files = TlsFiles::load(
                    cert.as_ref(),
                    key.as_ref(),
                    ALPN,
                    settings.tls_handshake_timeout(),
                )?;
                let tcp = TcpListener::bind(addr.clone())
                    .into_acceptor()
                    .await
                    .with_context(|| format!("cannot listen on {addr} (https_addr)"))?;
                let bound = tcp
                    .local_addr()
                    .first()
                    .and_then(|a| a.as_socket_addr().copied());
                (Some((TlsAcceptor::new(tcp, files.clone()), files)), bound)
            }
            None => (None, None),
        };
        let notifier = Notifier::default();
        let (ingestor, ingest_task) =
            Ingestor::start(db.clone(), settings.ingest_batch_max, notifier.clone());
        let (stop_background, stopped) = watch::channel(false);
        let sweeper = commands::spawn_sweeper(
            db.clone(),
            notifier.clone(),
            settings.command_sweep_interval(),
            stopped.clone(),
        );
        let checkpointer = spawn_checkpointer(db.clone(), stopped.clone());
        let tokens = TokenCache::new(Duration::from_millis(settings.token_cache_ttl_ms));
        let login_limits = LoginLimits::new(settings.login_attempts_per_minute);
        let broker_enabled = settings.broker_enabled();
        let state = Arc::new(AppState {
            legacy: settings.legacy_policy(),
            settings,
            db,
            ingestor,
            tokens,
            notifier,
            limits,
            auth,
            login_limits,
            broker: BrokerHealth::new(broker_enabled),
            stopping: watch::channel(false).0,
        });
        let broker = mqtt::Broker::start(state.clone()).await?;
        let upkeep = http::metrics::spawn_upkeep(stopped.clone());
        let housekeeper = spawn_housekeeper(state.clone(), stopped);
        Ok(Application {
            state,
            acceptor,
            http_addr,
            ingest_task,
            sweeper,
            checkpointer,
            housekeeper,
            upkeep,
            metrics_acceptor,
            metrics_addr,
            tls,
            https_addr,
            stop_background,
            broker,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where the HTTPS listener listens, when `https_addr` is set.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    /// Where the dedicated `/metrics` listener listens, when `metrics_addr` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where the embedded MQTT broker listens; `None` when MQTT is off.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.broker.as_ref().and_then(mqtt::Broker::addr)
    }

    /// Where the broker listens for MQTT over TLS; `None` when `mqtts_addr` is off.
    pub fn mqtts_addr(&self) -> Option<SocketAddr> {
        self.broker.as_ref().and_then(mqtt::Broker::tls_addr)
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then closes the MQTT listener and connections, lets
    /// in-flight requests finish, commits every queued event, records presence and closes the
    /// database.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let app = http::routes(self.state.clone());
        let idle = Duration::from_secs(self.state.settings.http_idle_timeout_secs);
        let (stop_metrics, metrics_stopped) = watch::channel(false);
        let metrics_server = self.metrics_acceptor.map(|acceptor| {
            let mut stopped = metrics_stopped;
            let routes = http::metrics_routes(self.state.clone());
            tokio::spawn(async move {
                let stop = async move {
                    let _ = stopped.changed().await;
                };
                if let Err(err) = Server::new_with_acceptor(acceptor)
                    .run_with_graceful_shutdown(routes, stop, Some(Duration::from_secs(1)))
                    .await
                {
                    tracing::error!(error = %err, "metrics listener failed");
                }
            })
        });
        let stop_mqtt = self.broker.as_ref().map(mqtt::Broker::stopper);
        let state = self.state.clone();
        let shutdown = async move {
            shutdown.await;
            state.stopping.send_replace(true);
            if let Some(stop) = stop_mqtt {
                let _ = stop.send(true);
            }
        };
        let (acceptor, reloader) = match self.tls {
            Some((tls, files)) => (
                self.acceptor.combine(tls).boxed(),
                Some(files.spawn_reloader(self.stop_background.subscribe())),
            ),
            None => (self.acceptor.boxed(), None),
        };
        Server::new_with_acceptor(acceptor)
            .idle_timeout(idle)
            .run_with_graceful_shutdown(app, shutdown, Some(Duration::from_secs(10)))
            .await
            .context("HTTP server failed")?;
        let _ = stop_metrics.send(true);
        if let Some(server) = metrics_server {
            let _ = server.await;
        }
        if let Some(broker) = self.broker {
            broker.shutdown().await;
        }
        self.state.ingestor.shutdown();
        if let Err(err) = self.ingest_task.await {
            tracing::error!(error = %err, "event writer ended abnormally");
        }
        let _ = self.stop_background.send(true);
        let _ = self.sweeper.await;
        let _ = self.checkpointer.await;
        let _ = self.housekeeper.await;
        let _ = self.upkeep.await;
        if let Some(reloader) = reloader {
            let _ = reloader.await;
        }
        // Closing the pools checkpoints SQLite's WAL back into the database file.
        if let Err(err) = self.state.db.clone().close().await {
            tracing::warn!(error = %err, "closing the database failed");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Checkpoints the SQLite WAL every second, off the event writer's path.
fn spawn_checkpointer(db: Db, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if let Err(err) = db.checkpoint().await {
                        tracing::warn!(error = %err, "WAL checkpoint failed");
                    }
                }
                _ = stop.changed() => break,
            }
        }
    })
}

/// Forgets rate-limit keys whose budget is full again, once a minute.
fn spawn_housekeeper(state: Arc<AppState>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(60));
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    state.limits.housekeep();
                    state.login_limits.housekeep();
                }
                _ = stop.changed() => break,
            }
        }
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested; finishing in-flight work");
}
