//! `segattn serve`: the model behind HTTP, for programs and for people.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::{EXIT_OK, ModelArgs, values};
use crate::image_io::DEFAULT_MAX_PIXELS;
use crate::serve::{self, Options, Service};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on: loopback unless another is given (0.0.0.0 for
    /// every interface; then give --token).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free one, printed at start).
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// Requests run at once (default: all cores; at most twice the cores).
    #[arg(long, short = 'j', value_name = "N", value_parser = values::at_least_one)]
    jobs: Option<usize>,
    /// Requests waiting for a worker; past it a request gets 503 and Retry-After.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = values::at_least_one)]
    queue: usize,
    /// Largest request body, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 32 << 20)]
    max_body: usize,
    /// Seconds a request may wait and run before it gets 504.
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = values::at_least_one)]
    timeout: usize,
    /// Seconds a client may take to send its request before it gets 408.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = values::at_least_one)]
    read_timeout: usize,
    /// A file holding a bearer token that every request but /healthz must
    /// carry (Authorization: Bearer TOKEN).
    #[arg(long, value_name = "FILE")]
    token: Option<PathBuf>,
    /// Refuse photos with more pixels than this (413).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
}

pub fn run(args: ServeArgs) -> Result<u8> {
    let token = match &args.token {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("{}: cannot read token", path.display()))?;
            let token = text.trim().to_string();
            if token.is_empty() || token.contains(char::is_whitespace) {
                bail!("{}: the token must be one word", path.display());
            }
            Some(token)
        }
        None => None,
    };
    if !args.host.is_loopback() && token.is_none() {
        note!("segattn: warning: serving on {} without --token: anyone who can reach it may use it", args.host);
    }
    let listener = TcpListener::bind(SocketAddr::new(args.host, args.port))
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let model = args.model.load()?;
    let name = args.model.model.clone().unwrap_or_else(|| match &args.model.weights {
        Some(path) => path.display().to_string(),
        None => crate::model::builtin::NAME.to_string(),
    });
    let size = args.model.short_side(&model);
    let service = Service::new(model, name, size, args.max_pixels)?;
    let workers = values::worker_threads(args.jobs);
    let options = Options {
        workers,
        queue: args.queue,
        connections: args.queue + 2 * workers + 16,
        max_body: args.max_body,
        read_timeout: Duration::from_secs(args.read_timeout as u64),
        timeout: Duration::from_secs(args.timeout as u64),
        token,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("cannot handle signals")?;
    }
    note!("segattn: serving on http://{}", listener.local_addr()?);
    serve::serve(listener, service, options, Arc::clone(&stop))?;
    note!(
        "segattn: stopped{}",
        if stop.load(Ordering::SeqCst) { " by a signal; every request read was answered" } else { "" }
    );
    Ok(EXIT_OK)
}
