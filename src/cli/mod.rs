//! The command line: argument parsing (clap) and one function per command
//! that turns arguments into calls on the library and results into output.
//! Errors get their context here (anyhow), where it is known what the user asked.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::archive::WriterOptions;
use crate::paths::{Anchors, PathSpec};
use crate::progress::Progress;
use crate::restore::{self, Source};
use crate::save;
use crate::store::layout::{self, LayoutError};
use crate::store::url::split_object_url;
use crate::store::{AnyStore, StoreUrl};

/// Exit code of `restore` when no cache matches the key or any fallback, so CI
/// scripts can tell a cache miss from a failure.
pub const EXIT_CACHE_MISS: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "cachemount",
    version,
    about = "Save, restore and lazily mount CI caches (zip + zstd, Buildkite cache v2 compatible)"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Where caches live: s3://bucket/prefix, file:///dir or a directory.
    /// Default: a local store under the user's cache directory.
    #[arg(long, global = true, env = "CACHEMOUNT_STORE")]
    pub store: Option<String>,
    /// S3 endpoint for S3-compatible servers (also AWS_ENDPOINT_URL).
    #[arg(long, global = true, env = "AWS_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    /// AWS region (default: from the AWS config, else us-east-1).
    #[arg(long, global = true)]
    pub region: Option<String>,
    /// No progress bar.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Archive PATHs and store them under a key.
    Save {
        #[arg(long)]
        key: String,
        /// zstd compression level.
        #[arg(long, default_value_t = 3)]
        level: i32,
        /// Paths to save: relative to the working dir, under ~, or absolute.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Download a cache and unpack it (for machines without FUSE).
    Restore {
        #[command(flatten)]
        source: SourceArgs,
        /// Paths to restore (default: every path the cache holds).
        paths: Vec<String>,
    },
    /// List the keys in the store: key, size, age, digest.
    Keys {
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
    },
}

/// A cache by key (with fallbacks), or a raw archive object by URL.
#[derive(Args, Debug)]
pub struct SourceArgs {
    /// The cache key.
    #[arg(long)]
    pub key: Option<String>,
    /// Key prefixes to try, in order, when the key has no cache (newest match wins).
    #[arg(long = "fallback", requires = "key")]
    pub fallbacks: Vec<String>,
    /// An archive object no key points to (s3://bucket/path.zip, file:///path.zip).
    #[arg(long, conflicts_with = "key")]
    pub url: Option<String>,
}

impl SourceArgs {
    /// Accepts `COMMAND URL [PATH…]`: without `--key`/`--url`, a first
    /// positional that looks like a URL names the object.
    pub fn take_url_from(&mut self, paths: &mut Vec<String>) -> Result<(), clap::Error> {
        if self.key.is_none() && self.url.is_none() {
            match paths.first() {
                Some(first) if first.contains("://") => self.url = Some(paths.remove(0)),
                _ => {
                    return Err(<Cli as clap::CommandFactory>::command().error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "name the cache: --key KEY (with optional --fallback PREFIX…), or an archive URL (s3://bucket/path.zip, file:///path.zip)",
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Command::Restore { source, paths } = &mut cli.command {
        if let Err(e) = source.take_url_from(paths) {
            e.exit();
        }
    }
    init_logging(cli.global.verbose);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if matches!(
                e.downcast_ref::<LayoutError>(),
                Some(LayoutError::NoMatch { .. })
            ) {
                ExitCode::from(EXIT_CACHE_MISS)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("cachemount={default},warn"))
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn open_store(global: &GlobalArgs) -> anyhow::Result<AnyStore> {
    let url = match &global.store {
        Some(s) => StoreUrl::parse(s)?,
        None => StoreUrl::default_local()?,
    };
    AnyStore::open(&url, global.endpoint_url.clone(), global.region.clone())
        .await
        .with_context(|| format!("cannot open the store {url}"))
}

fn parse_specs(paths: &[String], anchors: &Anchors) -> anyhow::Result<Vec<PathSpec>> {
    paths
        .iter()
        .map(|p| PathSpec::parse(p, anchors).map_err(anyhow::Error::from))
        .collect()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let anchors = Anchors::from_env().context("cannot determine the working directory")?;
    match cli.command {
        Command::Save { key, level, paths } => {
            let store = open_store(&cli.global).await?;
            let specs = parse_specs(&paths, &anchors)?;
            let options = WriterOptions {
                level,
                ..WriterOptions::default()
            };
            let report = save::save(
                &store,
                &key,
                &specs,
                &anchors,
                options,
                Progress::new("saving", cli.global.quiet),
            )
            .await?;
            println!(
                "saved {key}: {} entries, {} archive sha256:{} ({})",
                report.entries,
                human_bytes(report.archive_size),
                report.digest,
                if report.uploaded {
                    "uploaded"
                } else {
                    "already in the store, not uploaded"
                }
            );
        }
        Command::Restore { source, paths } => {
            let specs = parse_specs(&paths, &anchors)?;
            let progress = Progress::new("downloading", cli.global.quiet);
            let (report, what) = if let Some(url) = source.url {
                let (store_url, object) = split_object_url(&url)?;
                let store = AnyStore::open(
                    &store_url,
                    cli.global.endpoint_url.clone(),
                    cli.global.region.clone(),
                )
                .await
                .with_context(|| format!("cannot open {url}"))?;
                let src = Source {
                    store: &store,
                    key: object,
                    content_addressed: false,
                    expected_digest: None,
                };
                (
                    restore::restore(src, &specs, &anchors, progress).await?,
                    url,
                )
            } else {
                let key = source.key.expect("clap requires --key or a URL");
                let store = open_store(&cli.global).await?;
                let resolved = layout::resolve(&store, &key, &source.fallbacks).await?;
                let src = Source {
                    store: &store,
                    key: resolved.pointer.blob_key(),
                    content_addressed: true,
                    expected_digest: Some(resolved.pointer.digest.clone()),
                };
                let report = restore::restore(src, &specs, &anchors, progress).await?;
                let what = if resolved.key == key {
                    key
                } else {
                    format!("{} (fallback for {key})", resolved.key)
                };
                (report, what)
            };
            let paths: Vec<String> = report
                .restored
                .iter()
                .map(|p: &PathBuf| p.display().to_string())
                .collect();
            println!(
                "restored {what} ({}) into {}",
                human_bytes(report.archive_size),
                paths.join(", ")
            );
        }
        Command::Keys { prefix } => {
            let store = open_store(&cli.global).await?;
            let keys = layout::list_keys(&store, &prefix).await?;
            let now = layout::unix_now();
            println!("{:<40} {:>10} {:>8}  DIGEST", "KEY", "SIZE", "AGE");
            for k in keys {
                let age = now.saturating_sub(k.pointer.created);
                println!(
                    "{:<40} {:>10} {:>8}  {}",
                    k.key,
                    human_bytes(k.pointer.size),
                    human_age(age),
                    &k.pointer.digest[..16]
                );
            }
        }
    }
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}
