//! `api`: the Keel api binary.
//!
//! ```text
//! api [--config FILE] [serve]   run the api (migrates first by default)
//! api [--config FILE] migrate   apply migrations and exit
//! api openapi                   print the OpenAPI document (used by make codegen)
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use keel_api::{Config, telemetry};

enum Command {
    Serve,
    Migrate,
    Openapi,
}

fn parse_args() -> anyhow::Result<(Command, Option<PathBuf>)> {
    let mut args = std::env::args().skip(1);
    let mut config = std::env::var_os("KEEL_CONFIG").map(PathBuf::from);
    let mut command = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => config = Some(args.next().context("--config needs a file")?.into()),
            "serve" if command.is_none() => command = Some(Command::Serve),
            "migrate" if command.is_none() => command = Some(Command::Migrate),
            "openapi" if command.is_none() => command = Some(Command::Openapi),
            other => bail!(
                "unexpected argument `{other}`; usage: api [--config FILE] [serve|migrate|openapi]"
            ),
        }
    }
    Ok((command.unwrap_or(Command::Serve), config))
}

async fn run() -> anyhow::Result<()> {
    let (command, config_file) = parse_args()?;
    if let Command::Openapi = command {
        print!("{}", keel_api::openapi::document_json());
        return Ok(());
    }
    let config = Config::load(config_file.as_deref())?;
    telemetry::init(&config.log);
    match command {
        Command::Migrate => {
            keel_db::migrate(&config.database)
                .await
                .context("applying migrations")?;
            tracing::info!("migrations applied");
            Ok(())
        }
        _ => keel_api::serve(config).await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("api: {error:#}");
            ExitCode::FAILURE
        }
    }
}
