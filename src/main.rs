//! The `payroc-broker` command line. All logic lives in the library; this file
//! parses arguments, sets up logging and maps failures to exit codes
//! (2: configuration or usage, 1: runtime).

use std::{io::Write, net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand};
use payroc_broker::{
    clock::{Clock, OsEntropy, SharedEntropy},
    config::{self, CONFIG_ENV, Config},
    sandbox::Sandbox,
    server,
};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "payroc-broker",
    version,
    about = "gRPC credentials broker for Payroc's Bearer and Hosted Fields session tokens"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the TokenBroker gRPC API.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, env = CONFIG_ENV)]
        config: PathBuf,
        /// Listen address, overriding `server.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve without `[[callers]]`: anyone who can reach the port gets tokens.
        #[arg(long)]
        allow_unauthenticated: bool,
    },
    /// Serve against a built-in simulated Payroc with demo terminals.
    Sandbox {
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
    },
    /// Validate a configuration (secrets readable, URLs allowed) without contacting Payroc.
    CheckConfig {
        #[arg(long, env = CONFIG_ENV)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config, &config::process_env) {
            Ok(c) => {
                let terminals: usize = c.credentials.iter().map(|c| c.terminals.len()).sum();
                println!(
                    "{}: OK ({} credentials, {terminals} terminals, {} callers)",
                    config.display(),
                    c.credentials.len(),
                    c.callers.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        Command::Serve {
            config,
            listen,
            allow_unauthenticated,
        } => {
            let mut c = match Config::load(&config, &config::process_env) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            if c.callers.is_empty() && !allow_unauthenticated {
                eprintln!(
                    "error: {}: no [[callers]] are configured, so anyone who can reach the port would get \
                     Payroc tokens; add [[callers]] or pass --allow-unauthenticated",
                    config.display()
                );
                return ExitCode::from(2);
            }
            if let Some(addr) = listen {
                c.server.listen = addr;
            }
            run(async move { Ok((c, None)) })
        }
        Command::Sandbox { listen } => run(async move {
            let entropy: SharedEntropy = Arc::new(OsEntropy);
            let sandbox = Sandbox::start(listen, Clock::system(), entropy).await?;
            Ok((sandbox.config.clone(), Some(sandbox)))
        }),
    }
}

/// Builds the runtime, binds, serves until SIGTERM/SIGINT.
fn run(prepare: impl Future<Output = Result<(Config, Option<Sandbox>), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let (config, sandbox) = match prepare.await {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let listener = match TcpListener::bind(config.server.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {}: {e}", config.server.listen);
                return ExitCode::FAILURE;
            }
        };
        if let Some(sandbox) = &sandbox {
            let addr = listener.local_addr().unwrap_or(config.server.listen);
            // Not println!: it panics if stdout is already closed.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", sandbox.instructions(addr)).and_then(|()| out.flush());
        }
        let entropy: SharedEntropy = Arc::new(OsEntropy);
        match server::serve(
            listener,
            &config,
            Clock::system(),
            entropy,
            server::shutdown_signal(),
        )
        .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn config_error(e: &config::ConfigError) -> ExitCode {
    for line in e.to_string().lines() {
        eprintln!("error: {line}");
    }
    ExitCode::from(2)
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`). No secret is
/// ever a field or message, so every level is safe to enable.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // Its default reports a failed write with eprintln!, which panics when
        // stderr is a closed pipe: a dead log collector must not fail RPCs.
        .log_internal_errors(false)
        .init();
}
