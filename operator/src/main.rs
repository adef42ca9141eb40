//! The m3o-operator binary.

mod admin;
mod cli;
mod fence;
mod http;
mod leader;
mod outbox;
mod parked_events;
mod run;
mod startup;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) {
    // sqlx's per-statement lines are noise here; its warnings (slow statements) stay.
    let filter =
        EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal, not in a file or a collector.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crds => match m3o_crds::crds_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                Ok(())
            }
            Err(err) => Err(startup::StartupError(format!("cannot render CRDs: {err}"))),
        },
        Command::Migrate(args) => {
            init_logging(args.logging.log_format);
            run::migrate(args).await
        }
        Command::Outbox(command) => {
            init_logging(command.common().database.logging.log_format);
            outbox::run(command).await
        }
        Command::Run(args) => {
            init_logging(args.backends.database.logging.log_format);
            run::run(*args).await
        }
        Command::UninstallCheck(args) => admin::uninstall::run(args).await,
        Command::Usage(args) => {
            init_logging(args.database.logging.log_format);
            admin::usage::run(*args).await
        }
        Command::Inspect(args) => {
            init_logging(args.backends.database.logging.log_format);
            admin::inspect::run(*args).await
        }
        Command::Audit(args) => {
            init_logging(args.backends.database.logging.log_format);
            match admin::audit::run(*args).await {
                // Differences found: the report says which; 1 so a CronJob or CI step fails.
                Ok(false) => return ExitCode::from(1),
                Ok(true) => Ok(()),
                // Could not audit at all: 2, told apart from differences.
                Err(err) => {
                    eprintln!("m3o-operator: error: {err}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line naming the flag, not a backtrace: this is what an admin reads.
            eprintln!("m3o-operator: error: {err}");
            ExitCode::FAILURE
        }
    }
}
