//! `m3o-gateway-auth [run] | usage`.

use std::process::ExitCode;

use clap::Parser;
use m3o_gateway::settings::{Cli, Command, LogFormat, RedisArgs, UsageArgs};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Usage(args)) => usage(args).await,
        Some(Command::Run(args)) => run(*args).await,
        Some(Command::NginxConfig(args)) => {
            let site = m3o_gateway::nginx::site(&args.listen, &args.auth, &args.upstream);
            match args.standalone_dir {
                Some(dir) => print!("{}", m3o_gateway::nginx::standalone(&dir, &site)),
                None => print!("{site}"),
            }
            Ok(())
        }
        None => run(cli.run).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("m3o-gateway-auth: error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: m3o_gateway::settings::RunArgs) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let shutdown_delay = args.shutdown_delay;
    let mut gateway = m3o_gateway::start(args).await.map_err(|e| e.to_string())?;
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    // SIGTERM (Kubernetes) drains; Ctrl-C stops at once.
    let drain = tokio::select! {
        _ = tokio::signal::ctrl_c() => false,
        _ = terminate => true,
        _ = gateway.wait() => return Err("a server stopped unexpectedly".into()),
    };
    tracing::info!("shutting down");
    if drain {
        gateway.drain(shutdown_delay).await;
    } else {
        gateway.stop().await;
    }
    Ok(())
}

async fn usage(args: UsageArgs) -> Result<(), String> {
    let RedisArgs {
        connection,
        redis_prefix,
    } = args.redis;
    let client = connection.client().map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("--redis-url: cannot connect: {e}"))?;
    let rows = m3o_gateway::usage::read(&mut conn, &redis_prefix, &args.customer)
        .await
        .map_err(|e| format!("reading usage: {e}"))?;
    print!("{}", m3o_gateway::usage::render(&rows));
    Ok(())
}
