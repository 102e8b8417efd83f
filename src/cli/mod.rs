//! The command line: argument parsing (clap) and one function per command
//! that turns arguments into calls on the library and results into output.
//! Errors get their context here (anyhow), where it is known what the user asked.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::archive::WriterOptions;
use crate::cache::version::{open_version, refresh_lifetime, Refresh, REFRESH_AFTER};
use crate::cache::{FetchConfig, Stats};
use crate::mount::daemon::{self, MountOptions};
use crate::mount::{control, overlay};
use crate::paths::{Anchors, PathSpec};
use crate::progress::Progress;
use crate::restore::{self, Source};
use crate::save;
use crate::store::layout::{self, LayoutError};
use crate::store::s3::RetryPolicy;
use crate::store::url::split_object_url;
use crate::store::{AnyStore, StoreResult, StoreUrl};
use crate::tree::extract::ExtractOptions;

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
    /// Refresh a cache's lifetime (for bucket expiry rules) when it is older
    /// than this many seconds (0: every time).
    #[arg(long, global = true, hide = true, env = "CACHEMOUNT_REFRESH_AFTER_SECS", value_parser = NamingTheVariable(parse_age))]
    pub refresh_after_secs: Option<Duration>,
    /// Attempts per S3 request, the first included (default 5).
    #[arg(long, global = true, hide = true, env = "CACHEMOUNT_S3_ATTEMPTS", value_parser = NamingTheVariable(parse_attempts))]
    pub s3_attempts: Option<u32>,
    /// Seconds one attempt of an S3 read waits for its response (default 20).
    #[arg(long, global = true, hide = true, env = "CACHEMOUNT_S3_READ_TIMEOUT", value_parser = NamingTheVariable(parse_seconds))]
    pub s3_read_timeout: Option<Duration>,
    /// Seconds without a body byte before a GET is resumed (default 10).
    #[arg(long, global = true, hide = true, env = "CACHEMOUNT_S3_STALL_TIMEOUT", value_parser = NamingTheVariable(parse_seconds))]
    pub s3_stall_timeout: Option<Duration>,
    /// Seconds after which one S3 read fails (default 120).
    #[arg(long, global = true, hide = true, env = "CACHEMOUNT_S3_READ_DEADLINE", value_parser = NamingTheVariable(parse_seconds))]
    pub s3_read_deadline: Option<Duration>,
}

impl GlobalArgs {
    fn refresh_after(&self) -> Duration {
        self.refresh_after_secs.unwrap_or(REFRESH_AFTER)
    }

    /// The S3 retry policy: the library's defaults, with what the `--s3-*`
    /// flags (or their `CACHEMOUNT_S3_*` variables) set.
    pub fn retry_policy(&self) -> RetryPolicy {
        let default = RetryPolicy::default();
        RetryPolicy {
            max_attempts: self.s3_attempts.unwrap_or(default.max_attempts),
            read_attempt_timeout: self.s3_read_timeout.unwrap_or(default.read_attempt_timeout),
            body_stall_timeout: self.s3_stall_timeout.unwrap_or(default.body_stall_timeout),
            read_deadline: self.s3_read_deadline.unwrap_or(default.read_deadline),
            ..default
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Archive PATHs and store them under a key. A PATH that is a writable
    /// mount is saved incrementally: only what changed is uploaded.
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
        /// Give restored files the owner and group the archive records (as
        /// tar's option of that name; needs root). By default they belong to
        /// whoever restores them: a cache grants nothing.
        #[arg(long)]
        same_owner: bool,
    },
    /// Mount cached paths lazily (FUSE) instead of restoring them; returns
    /// once every path answers. `umount` undoes it.
    Mount {
        #[command(flatten)]
        source: SourceArgs,
        /// Paths to mount (default: every path the cache holds).
        paths: Vec<String>,
        /// Mount over a non-empty directory (its content is hidden while mounted).
        #[arg(long)]
        force: bool,
        /// Let the build change the paths: an overlay over the read-only
        /// mount keeps every change locally until `umount` (`save` of the
        /// path uploads only what changed). Needs --key.
        #[arg(long)]
        writable: bool,
        /// Keep the daemon attached (logs also go to stderr).
        #[arg(long)]
        foreground: bool,
        /// Bound of the decompressed block cache, in bytes (K, M, G suffixes: powers of 1024).
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        cache_size: u64,
        /// The daemon's log file (default: under the user's cache dir; printed).
        #[arg(long)]
        log_file: Option<PathBuf>,
        /// FUSE worker threads per mountpoint.
        #[arg(long, default_value_t = 4, hide = true)]
        fuse_threads: usize,
        /// Internal: this process is the daemon `mount` started.
        #[arg(long, hide = true)]
        daemon_child: bool,
        #[command(flatten)]
        fetch: FetchArgs,
    },
    /// Unmount paths mounted by `mount` (also stale ones whose daemon died).
    Umount {
        /// Detach a busy mount now; it goes away when its last user leaves.
        #[arg(long)]
        lazy: bool,
        /// For a writable mount: keep the changes made (the overlay's upper
        /// dir) instead of removing them; the path is printed.
        #[arg(long)]
        keep_changes: bool,
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Print a mount's counters: requests, bytes, cache hits and misses, read-ahead hits.
    Stats {
        /// A mounted path (the root of the mount).
        path: PathBuf,
    },
    /// List the keys in the store: key, size, age, digest.
    Keys {
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
    },
}

/// Tuning of the mount's fetcher, for benchmarking: hidden, read from the
/// environment (the daemon child inherits it); unset keeps the default of
/// [`FetchConfig`]. The value name is the variable, so that a malformed
/// value is reported under it.
#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Largest merged range GET, in bytes.
    #[arg(
        long,
        hide = true,
        env = "CACHEMOUNT_MAX_GET",
        value_name = "CACHEMOUNT_MAX_GET"
    )]
    max_get: Option<u64>,
    /// The largest read-ahead window, in blocks.
    #[arg(
        long,
        hide = true,
        env = "CACHEMOUNT_READAHEAD_BLOCKS",
        value_name = "CACHEMOUNT_READAHEAD_BLOCKS"
    )]
    readahead_blocks: Option<u32>,
    /// Compressed bytes of neighbours fetched along with a small file's miss.
    #[arg(
        long,
        hide = true,
        env = "CACHEMOUNT_NEIGHBOUR_BYTES",
        value_name = "CACHEMOUNT_NEIGHBOUR_BYTES"
    )]
    neighbour_bytes: Option<u64>,
}

impl FetchArgs {
    fn config(&self) -> FetchConfig {
        let default = FetchConfig::default();
        FetchConfig {
            max_get: self.max_get.unwrap_or(default.max_get),
            readahead_max_blocks: self
                .readahead_blocks
                .unwrap_or(default.readahead_max_blocks),
            neighbour_bytes: self.neighbour_bytes.unwrap_or(default.neighbour_bytes),
            ..default
        }
    }
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

/// Caps glibc's malloc arenas for the mount daemon. Each thread that
/// allocates gets an arena of its own by default, and blocks freed by one
/// thread but allocated by another keep arenas resident: with the FUSE, tokio
/// and decode threads that tripled the daemon's peak RSS over its cache size
/// (358 MiB vs 158 MiB for a 64 MiB cache in tests/mount_memory.rs).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Command::Restore { source, paths, .. } | Command::Mount { source, paths, .. } =
        &mut cli.command
    {
        if let Err(e) = source.take_url_from(paths) {
            e.exit();
        }
    }
    match &cli.command {
        Command::Mount {
            foreground: false,
            daemon_child: false,
            log_file,
            ..
        } => return mount_parent(log_file.clone()),
        Command::Mount {
            foreground,
            log_file,
            ..
        } => {
            limit_malloc_arenas();
            init_mount_logging(cli.global.verbose, log_file.as_deref(), *foreground)
        }
        _ => init_logging(cli.global.verbose),
    }
    // Deep trees recurse (walk, extraction): give worker threads room for it.
    const WORKER_STACK: usize = 16 << 20;
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(WORKER_STACK)
        .build_global();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(WORKER_STACK)
        .build()
    {
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
    open_store_at(global, &url)
        .await
        .with_context(|| format!("cannot open the store {url}"))
}

/// The store at `url`, configured by the global arguments.
async fn open_store_at(global: &GlobalArgs, url: &StoreUrl) -> StoreResult<AnyStore> {
    AnyStore::open(
        url,
        global.endpoint_url.clone(),
        global.region.clone(),
        global.retry_policy(),
    )
    .await
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
            let how = if report.unchanged {
                "unchanged since it was mounted: only the key was written".to_string()
            } else if !report.uploaded {
                "already in the store, not uploaded".to_string()
            } else if report.reused_files > 0 {
                format!(
                    "incremental: {} unchanged files ({}) reused from the mounted cache",
                    report.reused_files,
                    human_bytes(report.reused_bytes)
                )
            } else {
                "uploaded".to_string()
            };
            println!(
                "saved {key}: {} entries, {} archive sha256:{} ({how})",
                report.entries,
                human_bytes(report.archive_size),
                report.digest,
            );
            println!(
                "transferred: {} bytes uploaded, {} bytes copied inside the store, {} bytes downloaded; archive {} bytes",
                report.transfer.uploaded,
                report.transfer.copied,
                report.transfer.downloaded,
                report.archive_size
            );
        }
        Command::Restore {
            source,
            paths,
            same_owner,
        } => {
            let specs = parse_specs(&paths, &anchors)?;
            let options = ExtractOptions { same_owner };
            let progress = Progress::new("downloading", cli.global.quiet);
            let (report, what) = if let Some(url) = source.url {
                let (store_url, object) = split_object_url(&url)?;
                let store = open_store_at(&cli.global, &store_url)
                    .await
                    .with_context(|| format!("cannot open {url}"))?;
                let src = Source {
                    store: &store,
                    key: object,
                    content_addressed: false,
                    expected_digest: None,
                    pointer: None,
                    refresh_after: cli.global.refresh_after(),
                };
                (
                    restore::restore(src, &specs, &anchors, options, progress).await?,
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
                    pointer: Some(layout::pointer_key(&resolved.key)?),
                    refresh_after: cli.global.refresh_after(),
                };
                let report = restore::restore(src, &specs, &anchors, options, progress).await?;
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
        Command::Mount {
            source,
            paths,
            force,
            writable,
            cache_size,
            fuse_threads,
            daemon_child,
            fetch,
            ..
        } => {
            let options = MountOptions {
                force,
                cache_size,
                fetch: fetch.config(),
                fuse_threads,
                writable,
            };
            let result =
                mount_and_serve(&cli.global, source, &paths, &anchors, options, daemon_child).await;
            if let (Err(e), true) = (&result, daemon_child) {
                let line = control::protocol_line(
                    "error",
                    &[&exit_code_of(e).to_string(), &format!("{e:#}")],
                );
                // The parent may be gone; the error is in the log either way.
                let mut stdout = std::io::stdout();
                let _ = std::io::Write::write_all(&mut stdout, line.as_bytes());
                let _ = std::io::Write::flush(&mut stdout);
            }
            result?;
        }
        Command::Umount {
            lazy,
            keep_changes,
            paths,
        } => {
            // Every path is tried; the failures make one error (one `error:` line).
            let mut failed = Vec::new();
            for p in &paths {
                match umount(std::path::Path::new(p), lazy, keep_changes) {
                    Ok(None) => println!("unmounted {p}"),
                    Ok(Some(kept)) => {
                        println!("unmounted {p}; its changes are kept in {}", kept.display())
                    }
                    Err(e) => failed.push(e),
                }
            }
            match failed.len() {
                0 => {}
                1 => return Err(failed.remove(0)),
                _ => anyhow::bail!(
                    "{}",
                    failed
                        .iter()
                        .map(|e| format!("{e:#}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            }
        }
        Command::Stats { path } => {
            // A writable mount's counters are on its read-only layer.
            let layer = overlay::find(&path).map_or(path, |w| w.lower);
            print!("{}", control::stats(&layer)?)
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

/// Unmounts `path`, both layers of a writable mount, whose changes are then
/// removed or (`keep_changes`) moved aside, to the returned path.
fn umount(
    path: &std::path::Path,
    lazy: bool,
    keep_changes: bool,
) -> anyhow::Result<Option<PathBuf>> {
    match overlay::find(path) {
        Some(w) => {
            w.unmount(lazy)?;
            w.discard(keep_changes)
        }
        None if keep_changes => {
            anyhow::bail!(
                "{} is not a writable mount: there are no changes to keep",
                path.display()
            )
        }
        None => control::unmount(path, lazy).map(|()| None),
    }
}

fn exit_code_of(e: &anyhow::Error) -> u8 {
    if matches!(
        e.downcast_ref::<LayoutError>(),
        Some(LayoutError::NoMatch { .. })
    ) {
        EXIT_CACHE_MISS
    } else {
        1
    }
}

/// `mount` without `--foreground`: start the daemon, wait for it, report.
fn mount_parent(log_file: Option<PathBuf>) -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let new_log = log_file.is_none();
    let log = match log_file.map_or_else(control::default_log_path, Ok) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if new_log {
        args.push("--log-file".into());
        args.push(log.clone().into());
    }
    match control::spawn_daemon(&args, &log, new_log, std::time::Duration::from_secs(600)) {
        Ok(started) => {
            for (path, nodes, mode) in &started.mounted {
                println!(
                    "mounted {} at {} ({nodes} entries, {mode})",
                    started.what,
                    path.display()
                );
            }
            println!("daemon pid {}, log {}", started.pid, log.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<control::DaemonFailed>() {
                Some(f) => ExitCode::from(f.code),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// The daemon logs at info level to its log file (its stderr, or in the
/// foreground both stderr and the file).
fn init_mount_logging(verbose: u8, log_file: Option<&std::path::Path>, foreground: bool) {
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    let default = if verbose > 1 { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("cachemount={default},warn"))
    });
    let file = match (foreground, log_file) {
        (true, Some(path)) => control::open_log(path, false).ok(),
        _ => None,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let _ = match file {
        Some(f) => builder
            .with_writer(std::io::stderr.and(std::sync::Arc::new(f)))
            .try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// Resolves the cache, opens it, mounts every path, reports readiness and
/// serves until unmounted.
async fn mount_and_serve(
    global: &GlobalArgs,
    source: SourceArgs,
    paths: &[String],
    anchors: &Anchors,
    options: MountOptions,
    daemon_child: bool,
) -> anyhow::Result<()> {
    let specs = parse_specs(paths, anchors)?;
    let signals = daemon::Signals::register().context("cannot handle signals")?;
    let started = std::time::Instant::now();
    let (store, key, digest, what, pointer) = if let Some(url) = source.url {
        let (store_url, object) = split_object_url(&url)?;
        let store = open_store_at(global, &store_url)
            .await
            .with_context(|| format!("cannot open {url}"))?;
        (store, object, None, url, None)
    } else {
        let key = source.key.expect("take_url_from requires --key or a URL");
        let store = open_store(global).await?;
        let resolved = layout::resolve(&store, &key, &source.fallbacks).await?;
        let what = if resolved.key == key {
            key
        } else {
            format!("{} (fallback for {key})", resolved.key)
        };
        let pointer = layout::pointer_key(&resolved.key).ok();
        (
            store,
            resolved.pointer.blob_key(),
            Some(resolved.pointer.digest.clone()),
            what,
            pointer,
        )
    };
    let stats = std::sync::Arc::new(Stats::default());
    let refresh = Refresh::After(global.refresh_after());
    let version = open_version(&store, &key, digest.as_deref(), refresh, Some(&stats)).await?;
    // The key pointer's lifetime too (the blob's was refreshed by open_version).
    if let Some(pointer) = &pointer {
        refresh_lifetime(&store, pointer, global.refresh_after()).await;
    }
    tracing::info!(
        "opened {key} ({} entries) in {} ms",
        version.index.entries.len(),
        started.elapsed().as_millis()
    );
    let targets = crate::paths::plan_targets(&version.index, &specs, anchors)?;
    for t in &targets {
        t.check_mountable()?;
    }
    let runtime = tokio::runtime::Handle::current();
    let store = std::sync::Arc::new(store);
    let d = tokio::task::spawn_blocking(move || {
        daemon::mount_all(store, version, digest, &targets, &options, stats, runtime)
    })
    .await??;
    if daemon_child {
        let mut out = String::new();
        for m in &d.mounted {
            let mode = if m.writable.is_some() {
                "writable"
            } else {
                "read-only"
            };
            out += &control::protocol_line(
                "mounted",
                &[&m.path.to_string_lossy(), &m.nodes.to_string(), mode],
            );
        }
        out += &control::protocol_line("ready", &[&std::process::id().to_string(), &what]);
        let mut stdout = std::io::stdout();
        let reported = std::io::Write::write_all(&mut stdout, out.as_bytes())
            .and_then(|()| std::io::Write::flush(&mut stdout));
        if let Err(e) = reported {
            // `mount` is gone (interrupted): nobody knows about this mount.
            tracing::error!("cannot report readiness to `cachemount mount` ({e}); unmounting");
            d.abandon();
            anyhow::bail!("the mount command went away before the mount was ready");
        }
        control::detach_stdout();
        // Hold no directory busy (every path the daemon uses is absolute now).
        let _ = std::env::set_current_dir("/");
    } else {
        for m in &d.mounted {
            let mode = if m.writable.is_some() {
                "writable"
            } else {
                "read-only"
            };
            println!(
                "mounted {what} at {} ({} entries, {mode})",
                m.path.display(),
                m.nodes
            );
        }
    }
    for m in &d.mounted {
        tracing::info!(
            "serving {what} at {} ({} entries); ready {} ms after start",
            m.path.display(),
            m.nodes,
            started.elapsed().as_millis()
        );
    }
    d.serve(signals).await
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

/// A value parser whose error names the flag's environment variable too: the
/// hidden tuning values usually come from `CACHEMOUNT_*` variables, and clap's own error
/// names only the flag, which the user never typed.
#[derive(Clone)]
struct NamingTheVariable<T>(fn(&str) -> Result<T, String>);

impl<T: Clone + Send + Sync + 'static> clap::builder::TypedValueParser for NamingTheVariable<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        let text = value.to_string_lossy();
        (self.0)(&text).map_err(|why| {
            let name = |a: &clap::Arg| {
                let flag = a.get_long().unwrap_or(a.get_id().as_str());
                match a.get_env() {
                    Some(var) => format!("{} (--{flag})", var.to_string_lossy()),
                    None => format!("--{flag}"),
                }
            };
            let what = arg.map(name).unwrap_or_default();
            cmd.clone().error(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value {text:?} for {what}: {why}"),
            )
        })
    }
}

/// `--s3-attempts`: a whole number from 1 to 100.
fn parse_attempts(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if (1..=100).contains(&n) => Ok(n),
        _ => Err("expected a whole number of attempts from 1 to 100".into()),
    }
}

/// A positive number of seconds, fractions allowed (`0.5`).
fn parse_seconds(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs < 1e9 => {
            Ok(Duration::from_secs_f64(secs))
        }
        _ => Err("expected a positive number of seconds".into()),
    }
}

/// A cache age in whole seconds, `0` included (refresh every time).
fn parse_age(s: &str) -> Result<Duration, String> {
    s.trim()
        .parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| "expected a whole number of seconds".into())
}

/// `1073741824`, `512K`, `64M`, `1G` (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(format!("unknown size suffix {c:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_flags_set_the_policy_and_leave_the_rest_default() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(["cachemount"].iter().chain(args).chain(&["keys"]));
            cli.map(|c| c.global.retry_policy())
        };
        let p = parse(&[
            "--s3-attempts=2",
            "--s3-read-timeout=0.5",
            "--s3-stall-timeout=1",
            "--s3-read-deadline=7",
        ])
        .unwrap();
        assert_eq!(p.max_attempts, 2);
        assert_eq!(p.read_attempt_timeout, Duration::from_millis(500));
        assert_eq!(p.body_stall_timeout, Duration::from_secs(1));
        assert_eq!(p.read_deadline, Duration::from_secs(7));
        assert_eq!(
            RetryPolicy {
                max_attempts: 5,
                read_attempt_timeout: Duration::from_secs(20),
                body_stall_timeout: Duration::from_secs(10),
                read_deadline: Duration::from_secs(120),
                ..p
            },
            RetryPolicy::default()
        );
        for bad in [
            "--s3-attempts=0",
            "--s3-attempts=101",
            "--s3-read-timeout=soon",
        ] {
            let err = parse(&[bad]).unwrap_err().to_string();
            assert!(err.contains("CACHEMOUNT_S3_"), "{bad}: {err}");
        }
    }
}
