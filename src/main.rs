//! The `drainproxy` binary: parse the command line, load the configuration, run. Every
//! outcome maps to an exit code here and nowhere else.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use drainproxy::cli::{Cli, Command, ConfigArgs, InjectArgs};
use drainproxy::config::{self, Config};
use drainproxy::lifecycle::Exit;

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;
const EXIT_ABANDONED: u8 = 3;

// The allocator is a build choice: jemalloc by default (feature `jemalloc`), mimalloc with
// `--features mimalloc`, the system's with `--no-default-features`.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check(args)) => check(&args),
        Some(Command::Run(args)) => run(&args),
        Some(Command::Demo) => demo(),
        Some(Command::Inject(args)) => inject(&args),
        None => run(&cli.run),
    }
}

/// The configuration, and what start-up reads or fills in from it: the TLS certificate and
/// key, the hooks' CA files and `${NAME}` templates. A problem with any is a configuration
/// error (exit code 2). `check` (`strict_env` false) usually runs where the pod's variables
/// (`POD_IP`) are not set: a variable missing there is returned by name, filled with a
/// stand-in so that the rest of the hook is still checked.
fn load(args: &ConfigArgs, strict_env: bool) -> Result<(Config, Vec<String>), String> {
    let cfg = config::load(args.config.as_deref(), std::env::vars(), &args.flags()).map_err(|e| e.to_string())?;
    let one_problem = |e: String| format!("invalid configuration (1 problem):\n  {e}\n");
    if let Some(tls) = &cfg.tls {
        drainproxy::tls::load(tls).map_err(|e| one_problem(e.to_string()))?;
    }
    let unset = std::cell::RefCell::new(std::collections::BTreeSet::new());
    let env = |name: &str| {
        std::env::var(name).ok().or_else(|| {
            unset.borrow_mut().insert(name.to_string());
            (!strict_env).then(|| "0".to_string())
        })
    };
    if let Err(e) = drainproxy::hooks::Hooks::prepare(&cfg.hooks, env) {
        // Point at the list in the file, as the other problems do.
        let place = args.config.as_deref().map(|path| {
            let line = std::fs::read_to_string(path).ok().and_then(|src| config::locate(&src, e.list));
            line.map_or(format!("{}: ", path.display()), |l| format!("{}:{l}: ", path.display()))
        });
        return Err(one_problem(format!("{}{e}", place.unwrap_or_default())));
    }
    Ok((cfg, unset.into_inner().into_iter().collect()))
}

fn check(args: &ConfigArgs) -> ExitCode {
    match load(args, false) {
        Ok((_, unset)) => {
            let name = args.config.as_ref().map_or("the built-in defaults".to_string(), |p| p.display().to_string());
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{name}: configuration is valid");
            for var in unset {
                let _ = writeln!(out, "note: the hooks use ${{{var}}}, which is not set here; `run` needs it");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = write!(std::io::stderr(), "{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn inject(args: &InjectArgs) -> ExitCode {
    use drainproxy::inject::{InjectOptions, Mode};
    use std::io::Read as _;
    let fail = |msg: String| {
        let _ = writeln!(std::io::stderr(), "drainproxy inject: {msg}");
        ExitCode::from(EXIT_CONFIG)
    };
    let duration = |flag: &str, v: &str| config::parse_duration(v).map(config::Dur).map_err(|e| format!("{flag}: {e}"));
    let opts = match (|| -> Result<InjectOptions, String> {
        let mut o = InjectOptions {
            mode: if args.mode == "classic" { Mode::Classic } else { Mode::Native },
            force: args.force,
            container: args.container.clone(),
            port: args.port,
            min_delay: duration("--min-delay", &args.min_delay)?,
            quiet_period: duration("--quiet-period", &args.quiet_period)?,
            max_duration: duration("--max-duration", &args.max_duration)?,
            ..InjectOptions::default()
        };
        if let Some(image) = &args.image {
            o.image = image.clone();
        }
        if o.min_delay >= o.max_duration {
            return Err("--min-delay must be less than --max-duration".into());
        }
        Ok(o)
    })() {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let mut input = String::new();
    let read = match args.file.as_deref() {
        None => std::io::stdin().read_to_string(&mut input).map(|_| ()),
        Some(p) if p.as_os_str() == "-" => std::io::stdin().read_to_string(&mut input).map(|_| ()),
        Some(p) => std::fs::read_to_string(p).map(|s| input = s),
    };
    if let Err(e) = read {
        return fail(format!("cannot read the manifests: {e}"));
    }
    match drainproxy::inject::inject(&input, &opts) {
        Ok(done) => {
            if args.dry_run {
                let mut out = std::io::stdout();
                for note in &done.notes {
                    let _ = writeln!(out, "{note}");
                }
                if done.notes.is_empty() {
                    let _ = writeln!(out, "nothing to change: no workload found");
                }
            } else {
                for note in done.notes.iter().filter(|n| n.level == drainproxy::inject::Level::Warning) {
                    let _ = writeln!(std::io::stderr(), "{note}");
                }
                let _ = write!(std::io::stdout(), "{}", done.output);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.to_string()),
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
    let cfg = match load(args, true) {
        Ok((c, _)) => c,
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
