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
        Some(Command::Demo) => demo(),
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

fn demo() -> ExitCode {
    // The demo's own report is the output; proxy logs only when asked for with RUST_LOG.
    if std::env::var_os("RUST_LOG").is_some() {
        drainproxy::logging::init(&config::LogConfig::default());
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "drainproxy demo: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let mut out = std::io::stdout();
    match rt.block_on(drainproxy::demo::run(&drainproxy::demo::DemoOptions::default(), &mut out)) {
        Ok((with, _)) if with.failed() == 0 => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(EXIT_RUNTIME),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "drainproxy demo: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
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
