//! `miren`: the one binary. `miren server` runs a coordinator; every other
//! command is a client of one (see `config` for how the cluster is chosen).

// No `unwrap`/`expect` outside tests: input never panics the CLI.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod appconfig;
mod args;
mod ci;
mod cmd;
mod config;
mod connect;
mod machine;
mod output;
mod pack;

use clap::{Parser, Subcommand};

/// What this binary is (see `build.rs`).
pub fn build_info() -> transport::build_info::BuildInfo {
    transport::build_info::BuildInfo {
        version: env!("MIREN_BUILD_VERSION").into(),
        commit: env!("MIREN_BUILD_COMMIT").into(),
        date: env!("MIREN_BUILD_DATE").into(),
    }
}

/// `--version`: the same line as `miren version`.
const LONG_VERSION: &str = concat!(
    env!("MIREN_BUILD_VERSION"),
    " (commit ",
    env!("MIREN_BUILD_COMMIT"),
    ", built ",
    env!("MIREN_BUILD_DATE"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "miren",
    version = LONG_VERSION,
    about = "A cluster runtime whose heart is identity"
)]
struct Cli {
    /// Cluster to talk to (a name from the client config).
    #[arg(short = 'C', long = "cluster", global = true)]
    cluster: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a coordinator (the cluster's CA, signing keys and store).
    Server(Box<cmd::server::ServerArgs>),
    /// Pack the app in a directory, upload it and roll it out.
    Deploy(cmd::app::DeployArgs),
    /// Authentication: CI pipelines that may deploy apps.
    #[command(subcommand)]
    Auth(cmd::auth::AuthCmd),
    /// Output of an app's sandboxes.
    Logs(cmd::app::LogsArgs),
    /// HTTP routes: host -> app.
    #[command(subcommand)]
    Route(cmd::route::RouteCmd),
    /// Operate apps: list, status, delete.
    #[command(subcommand)]
    App(cmd::app::AppCmd),
    /// Manage the clusters this CLI knows.
    #[command(subcommand)]
    Cluster(cmd::cluster::ClusterCmd),
    /// Run a runner (`--join CODE` on first start), or manage runners and join codes.
    Runner(cmd::runner::RunnerArgs),
    /// Workload identity: signing keys and tokens.
    #[command(subcommand)]
    Identity(cmd::identity::IdentityCmd),
    /// The audit trail: tokens, CI logins, joins, keys, bindings, routes, admin changes.
    Audit(cmd::audit::AuditArgs),
    /// (internal) First process inside an isolated sandbox.
    #[command(hide = true)]
    SandboxShim {
        /// The runner's token endpoint for this sandbox (read-only dir).
        #[arg(long)]
        token_socket: std::path::PathBuf,
        /// The service's socket, bound by the runner, as a descriptor.
        #[arg(long)]
        app_listener_fd: i32,
        #[arg(long)]
        app_port: u16,
        #[arg(long)]
        token_port: u16,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print the version, git commit and build date of this binary.
    Version {
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: output::Format,
    },
    /// Print a shell completion script.
    Completion { shell: clap_complete::Shell },
}

/// mimalloc instead of glibc's allocator: the ingress allocates per request
/// (header maps, bodies' buffers, hyper's and quinn's state), and with it
/// the coordinator and runner spend less CPU per proxied request
/// (ARCHITECTURE.md, "Chosen dependencies").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Server(args) => cmd::server::run(*args),
        Command::Deploy(d) => cmd::app::deploy(d, cli.cluster.as_deref()),
        Command::Auth(a) => cmd::auth::run(a, cli.cluster.as_deref()),
        Command::Logs(l) => cmd::app::logs(l, cli.cluster.as_deref()),
        Command::Route(r) => cmd::route::run(r, cli.cluster.as_deref()),
        Command::App(a) => cmd::app::run(a, cli.cluster.as_deref()),
        Command::Cluster(c) => cmd::cluster::run(c, cli.cluster.as_deref()),
        Command::Runner(r) => cmd::runner::run(r, cli.cluster.as_deref()),
        Command::Identity(c) => cmd::identity::run(c, cli.cluster.as_deref()),
        Command::Audit(a) => cmd::audit::run(a, cli.cluster.as_deref()),
        Command::SandboxShim {
            token_socket,
            app_listener_fd,
            app_port,
            token_port,
            command,
        } => match runner::shim::ShimPaths::new(token_socket, app_listener_fd) {
            Ok(paths) => std::process::exit(runner::shim::main(
                paths,
                app_port,
                token_port,
                command.join(" "),
            )),
            Err(e) => {
                eprintln!("sandbox-shim: {e}");
                std::process::exit(70)
            }
        },
        Command::Version { output } => {
            let b = build_info();
            match output {
                output::Format::Json => output::json(&serde_json::json!({
                    "version": b.version, "commit": b.commit, "date": b.date,
                })),
                output::Format::Table => {
                    println!("miren {b}");
                    Ok(())
                }
            }
        }
        Command::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "miren", &mut std::io::stdout());
            Ok(())
        }
    };
    if let Err(e) = result {
        // Error texts carry the server's messages (and through them a
        // failed rollout's last log lines): escaped like everything else
        // printed from the cluster.
        let chain = transport::report::Chain(e.as_ref()).to_string();
        eprintln!("error: {}", output::terminal_safe_lines(&chain));
        std::process::exit(1);
    }
}
