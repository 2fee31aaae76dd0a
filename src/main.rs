//! The `drainproxy` binary: parse the command line, load the configuration, run. Every
//! outcome maps to an exit code here and nowhere else.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use drainproxy::cli::{Cli, Command, ConfigArgs};
use drainproxy::config::{self, Config, ConfigError};
use drainproxy::lifecycle::Exit;

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;
const EXIT_ABANDONED: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check(args)) => check(&args),
        Some(Command::Run(args)) => run(&args),
        None => run(&cli.run),
    }
}

fn load(args: &ConfigArgs) -> Result<Config, ConfigError> {
    config::load(args.config.as_deref(), std::env::vars(), &args.flags())
}

fn check(args: &ConfigArgs) -> ExitCode {
    match load(args) {
        Ok(_) => {
            let name = args.config.as_ref().map_or("the built-in defaults".to_string(), |p| p.display().to_string());
            let _ = writeln!(std::io::stdout(), "{name}: configuration is valid");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = write!(std::io::stderr(), "{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn run(args: &ConfigArgs) -> ExitCode {
    let cfg = match load(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = write!(std::io::stderr(), "{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    drainproxy::logging::init(&cfg.log);
    match drainproxy::app::run_blocking(cfg) {
        Ok(Exit::Drained) => ExitCode::SUCCESS,
        Ok(Exit::Abandoned) => ExitCode::from(EXIT_ABANDONED),
        Err(e) => {
            tracing::error!("{e:#}");
            let _ = writeln!(std::io::stderr(), "drainproxy: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
