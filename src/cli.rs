//! The `ozone` command line: `serve` (the default), `migrate`, `createsuperuser`, and the
//! operator commands `device assign` and `command send`, which work on the database directly so
//! a fleet can be scripted before any staff API is up.

use std::{
    io::{BufRead, IsTerminal, Write},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::{
    app::{self, Application},
    config::{Overrides, Settings},
    domain::{
        commands::{self, NewCommand},
        devices::TokenCache,
        fleet,
        users::{self, NewUser},
        wire_time,
    },
};

#[derive(Debug, Parser)]
#[command(
    name = "ozone",
    version,
    about = "Telemetry and command backend for ozone treatment machines"
)]
pub struct Cli {
    /// TOML settings file (lower precedence than environment and flags).
    #[arg(long, global = true, env = "OZONE_CONFIG")]
    pub config: Option<PathBuf>,
    /// HTTP listen address [env: OZONE_HTTP_ADDR] [default: 0.0.0.0:8000]
    #[arg(long, global = true)]
    pub http_addr: Option<String>,
    /// Embedded MQTT broker listen address [env: OZONE_MQTT_ADDR] [default: 0.0.0.0:1883]
    #[arg(long, global = true)]
    pub mqtt_addr: Option<String>,
    /// MQTT over TLS listen address, e.g. 0.0.0.0:8883; empty is off [env: OZONE_MQTTS_ADDR]
    #[arg(long, global = true)]
    pub mqtts_addr: Option<String>,
    /// Database URL [env: DATABASE_URL] [default: sqlite://ozone.db?mode=rwc]
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Create an admin account (asks for missing values on a terminal).
    Createsuperuser(CreateSuperuser),
    /// Manage devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Queue commands for devices.
    #[command(subcommand)]
    Command(CommandCommand),
    /// Write a consistent copy of the SQLite database to FILE, also while the server runs.
    Backup {
        /// Where the copy goes; must not exist yet.
        file: PathBuf,
    },
    /// Check the configuration, that the database answers and that its migrations are
    /// current. Exit code: 0 ok, 2 configuration invalid, 3 database unreachable, 4 migrations
    /// not current.
    Check,
    /// Print the OpenAPI spec of the HTTP API (what `/openapi.json` serves).
    Openapi {
        /// YAML instead of JSON.
        #[arg(long)]
        yaml: bool,
    },
}

#[derive(Debug, Args)]
pub struct CreateSuperuser {
    #[arg(long)]
    pub username: Option<String>,
    #[arg(long)]
    pub password: Option<String>,
    #[arg(long)]
    pub email: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Bind a device to a machine, creating the machine and outlet if needed.
    Assign {
        /// The device's id, or its MAC in any spelling.
        device_id: String,
        /// Machine code, e.g. CH1/027/2024.
        #[arg(long)]
        machine: String,
        /// Outlet name; the machine is moved to it.
        #[arg(long)]
        outlet: Option<String>,
    },
    /// Unbind a device from its machine.
    Unassign {
        /// The device's id, or its MAC in any spelling.
        device_id: String,
    },
    /// Forget a device's token so it can handshake again under `strict_handshake`.
    ResetToken {
        /// The device's id, or its MAC in any spelling.
        device_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CommandCommand {
    /// Queue a command for a device.
    Send {
        /// The device's id, or its MAC in any spelling.
        device_id: String,
        /// e.g. RESET, REBOOT.
        command_type: String,
        /// JSON payload.
        #[arg(long)]
        payload: Option<String>,
        /// Larger is more urgent.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// Seconds until the command times out.
        #[arg(long)]
        expires_in: Option<u64>,
        /// Shown to staff and sent to the device.
        #[arg(long, default_value = "")]
        description: String,
    },
}

pub fn main(cli: Cli) -> ExitCode {
    // Needs no configuration and no database.
    if let Some(Command::Openapi { yaml }) = cli.command {
        let spec = if yaml {
            crate::http::staff::spec_yaml()
        } else {
            crate::http::staff::spec_json()
        };
        println!("{spec}");
        return ExitCode::SUCCESS;
    }
    let overrides = Overrides {
        http_addr: cli.http_addr.clone(),
        mqtt_addr: cli.mqtt_addr.clone(),
        mqtts_addr: cli.mqtts_addr.clone(),
        database_url: cli.database_url.clone(),
    };
    let settings = match Settings::load(cli.config.as_deref(), &overrides) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("ozone: invalid configuration: {err:#}");
            return ExitCode::from(2);
        }
    };
    let command = cli.command.unwrap_or(Command::Serve);
    // Operator commands print their result; routine progress (migrations) would only clutter it.
    let quiet = !matches!(command, Command::Serve) && settings.log == Settings::default().log;
    init_tracing(
        if quiet { "warn" } else { &settings.log },
        settings.log_format == "json",
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("ozone: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Check = command {
        return runtime.block_on(check(&settings));
    }
    match runtime.block_on(run(command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ozone: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(filter: &str, json: bool) {
    let wanted = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_owned());
    // rumqttd logs routine connection events at `error`: quiet unless asked for by name.
    let wanted = if wanted.contains("rumqttd") {
        wanted
    } else {
        format!("{wanted},rumqttd=warn")
    };
    let filter = EnvFilter::try_new(&wanted)
        .ok()
        .or_else(|| EnvFilter::try_new(filter).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}

/// `ozone check`: prints one line per check on stdout; the exit code says which failed.
async fn check(settings: &Settings) -> ExitCode {
    use migration::MigratorTrait;

    println!("configuration: ok");
    let url = crate::config::redact_url(&settings.database_url);
    if let Some(file) = crate::db::sqlite_file(&settings.database_url) {
        if !file.is_file() {
            println!(
                "database: {url}: the file {} does not exist (the server creates it on start)",
                file.display()
            );
            return ExitCode::from(3);
        }
    }
    let db = match crate::db::Db::connect(&settings.database_url, 1).await {
        Ok(db) => db,
        Err(err) => {
            println!("database: {url}: unreachable: {err}");
            return ExitCode::from(3);
        }
    };
    if let Err(err) = db.ping().await {
        println!("database: {url}: unreachable: {err}");
        return ExitCode::from(3);
    }
    println!("database: {url}: ok");
    let pending = migration::Migrator::get_pending_migrations_read_only(db.conn()).await;
    let _ = db.close().await;
    match pending {
        Ok(pending) => {
            let pending: Vec<&str> = pending.iter().map(|m| m.name()).collect();
            if pending.is_empty() {
                println!(
                    "migrations: {} applied, none pending",
                    migration::Migrator::migrations().len()
                );
                ExitCode::SUCCESS
            } else {
                println!(
                    "migrations: {} pending ({}); run `ozone migrate` or start the server",
                    pending.len(),
                    pending.join(", ")
                );
                ExitCode::from(4)
            }
        }
        Err(err) => {
            // Typically a database migrated by a newer version of Ozone.
            println!("migrations: {err}");
            ExitCode::from(4)
        }
    }
}

/// `ozone backup FILE`.
async fn backup(settings: &Settings, file: &std::path::Path) -> anyhow::Result<()> {
    let url = crate::config::redact_url(&settings.database_url);
    let Some(source) = crate::db::sqlite_file(&settings.database_url) else {
        anyhow::bail!(
            "`ozone backup` copies SQLite databases; for {url} use PostgreSQL's own tools, \
             e.g. `pg_dump --format=custom --file ozone.dump <database URL>`"
        );
    };
    anyhow::ensure!(
        source.is_file(),
        "the database file {} does not exist",
        source.display()
    );
    anyhow::ensure!(
        !file.exists(),
        "{} already exists; choose a new file",
        file.display()
    );
    let db = crate::db::Db::connect(&settings.database_url, 1).await?;
    let result = db.backup_sqlite(file).await;
    db.close().await?;
    result.with_context(|| format!("backup to {} failed", file.display()))?;
    let bytes = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    println!(
        "backup of {url} written to {} ({bytes} bytes)",
        file.display()
    );
    Ok(())
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(settings).await,
        Command::Migrate => {
            let db = app::open_database(&settings).await?;
            db.close().await?;
            println!("database is up to date");
            Ok(())
        }
        Command::Createsuperuser(args) => create_superuser(settings, args).await,
        Command::Backup { file } => backup(&settings, &file).await,
        Command::Check => Ok(()),
        Command::Device(cmd) => device(settings, cmd).await,
        Command::Openapi { .. } => Ok(()),
        Command::Command(CommandCommand::Send {
            device_id,
            command_type,
            payload,
            priority,
            expires_in,
            description,
        }) => {
            let payload = payload
                .map(|p| serde_json::from_str::<serde_json::Value>(&p))
                .transpose()
                .map_err(|e| anyhow::anyhow!("--payload is not valid JSON: {e}"))?;
            let db = app::open_database(&settings).await?;
            // Another process (the server) notices it through the database.
            let created = commands::create(
                &db,
                &crate::domain::notify::Notifier::default(),
                &device_id,
                NewCommand {
                    command_type,
                    payload,
                    priority,
                    description,
                    expires_in: expires_in.map(Duration::from_secs),
                    created_by: Some("cli".into()),
                },
            )
            .await?;
            let device = crate::domain::devices::find_by_device_id(db.conn(), &device_id).await?;
            db.close().await?;
            println!(
                "{}",
                serde_json::json!({
                    "id": created.id,
                    "command_id": created.command_id,
                    "device_id": device.device_id,
                    "command_type": created.command_type,
                    "priority": created.priority,
                    "status": created.status,
                    "expires_at": created.expires_at.map(wire_time),
                })
            );
            Ok(())
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    tracing::debug!(?settings, "settings");
    let app = Application::build(settings.clone()).await?;
    let addr = app.http_addr();
    let shown = if addr.ip().is_unspecified() {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    };
    let shown_mqtt = |scheme: &str, addr: Option<std::net::SocketAddr>| match addr {
        Some(m) if m.ip().is_unspecified() => format!("{scheme}://localhost:{}", m.port()),
        Some(m) => format!("{scheme}://{m}"),
        None => "off".to_owned(),
    };
    let mqtt = shown_mqtt("mqtt", app.mqtt_addr());
    let mqtts = shown_mqtt("mqtts", app.mqtts_addr());
    tracing::info!(
        http = %addr,
        database = %crate::config::redact_url(&settings.database_url),
        "ozone is up: firmware API at http://{shown}/api/, health at http://{shown}/healthz, MQTT broker at {mqtt}, MQTT over TLS at {mqtts}"
    );
    app.run_until_stopped(app::shutdown_signal()).await
}

fn prompt(label: &str) -> anyhow::Result<String> {
    eprint!("{label}: ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

async fn create_superuser(settings: Settings, args: CreateSuperuser) -> anyhow::Result<()> {
    let interactive = std::io::stdin().is_terminal();
    let username = match args.username {
        Some(u) => u,
        None if interactive => prompt("Username")?,
        None => anyhow::bail!("--username is required when no terminal is attached"),
    };
    let email = match args.email {
        Some(e) => e,
        None if interactive => prompt("Email address (optional)")?,
        None => String::new(),
    };
    let password = match args.password {
        Some(p) => p,
        None if interactive => {
            let first = rpassword::prompt_password("Password: ")?;
            let again = rpassword::prompt_password("Password (again): ")?;
            anyhow::ensure!(first == again, "passwords do not match");
            first
        }
        None => anyhow::bail!("--password is required when no terminal is attached"),
    };
    let db = app::open_database(&settings).await?;
    let user = users::create(
        &db,
        NewUser {
            username,
            password,
            email,
            is_staff: true,
            is_superuser: true,
            ..Default::default()
        },
    )
    .await?;
    db.close().await?;
    println!("superuser `{}` created", user.username);
    Ok(())
}

async fn device(settings: Settings, cmd: DeviceCommand) -> anyhow::Result<()> {
    let db = app::open_database(&settings).await?;
    let cache = TokenCache::new(Duration::ZERO);
    match cmd {
        DeviceCommand::Assign {
            device_id,
            machine,
            outlet,
        } => {
            let a =
                fleet::assign_by_code(&db, &cache, &device_id, &machine, outlet.as_deref()).await?;
            println!(
                "{}",
                serde_json::json!({
                    "device_id": a.device.device_id,
                    "assigned": a.device.assigned,
                    "machine": { "id": a.machine.id, "machine_code": a.machine.machine_code, "created": a.created_machine },
                    "outlet": a.outlet.map(|o| serde_json::json!({ "id": o.id, "name": o.name, "created": a.created_outlet })),
                    "device_created": a.created_device,
                })
            );
        }
        DeviceCommand::Unassign { device_id } => {
            let device = fleet::unassign_device(&db, &cache, &device_id).await?;
            println!("device `{}` unassigned", device.device_id);
        }
        DeviceCommand::ResetToken { device_id } => {
            crate::domain::devices::reset_credentials(&db, &cache, &device_id).await?;
            println!("device `{device_id}` may handshake again");
        }
    }
    db.close().await?;
    Ok(())
}
