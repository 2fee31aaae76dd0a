//! The command line: `run` (the default), `check`. Maps every outcome to an exit code in one
//! place (`main`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::FlagOverrides;

#[derive(Debug, Parser)]
#[command(
    name = "drainproxy",
    version,
    about = "A sidecar reverse proxy that makes Kubernetes rollouts lossless",
    long_about = "drainproxy sits in front of your app in every pod. When the pod is deleted it \
                  turns readiness off, tells every connection to leave, forwards what still \
                  arrives, and releases the app's preStop hook only once traffic has really \
                  stopped.\n\nWith no subcommand, `run` is assumed.",
    after_help = "Exit codes: 0 drained and stopped, 1 runtime failure (e.g. cannot bind), \
                  2 invalid configuration or usage, 3 stopped before a drain released (SIGQUIT).\n\
                  Every config key can also be set as DRAINPROXY_<KEY>, e.g. DRAINPROXY_DRAIN_MIN_DELAY=3s.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: ConfigArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default)
    Run(ConfigArgs),
    /// Validate the configuration and exit: 0 when valid, 2 with every problem listed
    Check(ConfigArgs),
    /// Replace a pod under load on loopback, with and without drainproxy, and report
    Demo,
    /// Add drainproxy to Kubernetes manifests (Deployment, StatefulSet, DaemonSet, ReplicaSet, Pod)
    Inject(InjectArgs),
}

#[derive(Debug, Clone, Args)]
pub struct InjectArgs {
    /// Manifest file (multi-document YAML); `-` or nothing reads standard input
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// native: an init container with restartPolicy Always (Kubernetes >= 1.29); classic: a second container
    #[arg(long, value_parser = ["native", "classic"], default_value = "native")]
    pub mode: String,
    /// Replace an existing preStop hook on the app container (otherwise it is kept, with a warning)
    #[arg(long)]
    pub force: bool,
    /// Print what would change, not the manifests
    #[arg(long)]
    pub dry_run: bool,
    /// The app container (default: the first container)
    #[arg(long, value_name = "NAME")]
    pub container: Option<String>,
    /// The app's serving port (default: its first containerPort)
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// drainproxy image
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    pub min_delay: String,
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub quiet_period: String,
    #[arg(long, default_value = "25s", value_name = "DURATION")]
    pub max_duration: String,
}

#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// YAML configuration file; without it the built-in defaults apply
    #[arg(short, long, env = "DRAINPROXY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address clients connect to (overrides `listen`)
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Address of the admin API: probes, /drain, /metrics (overrides `admin`)
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// The app's address, normally 127.0.0.1:PORT (overrides `upstream.address`)
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: Option<String>,
}

impl ConfigArgs {
    pub fn flags(&self) -> FlagOverrides {
        FlagOverrides { listen: self.listen.clone(), admin: self.admin.clone(), upstream: self.upstream.clone() }
    }
}
