//! The command line: argument parsing (clap) and one function per command
//! that turns arguments into calls on the library and results into output.
//! Errors get their context here (anyhow), where it is known what the user asked.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use crate::archive::WriterOptions;
use crate::cache::disk::DiskCache;
use crate::cache::version::{open_version, refresh_lifetime, Refresh};
use crate::cache::Stats;
use crate::mount::daemon::{self, MountOptions};
use crate::mount::overlay::Overlays;
use crate::mount::startup::Phases;
use crate::mount::{control, preflight};
use crate::paths::{Anchors, PathSpec};
use crate::progress::Progress;
use crate::restore::{self, Source};
use crate::save::{self, SaveOptions};
use crate::store::layout::{self, LayoutError};
use crate::store::url::split_object_url;
use crate::store::{AnyStore, ObjectStore, StoreResult, StoreUrl};
use crate::tree::extract::ExtractOptions;

mod args;
mod doctor;
mod report;

pub use args::{CacheAction, Cli, Command, GlobalArgs, SourceArgs};

use report::{Hit, Matched, MissReport, MountReport, MountedPath};

/// Exit code of `restore` when no cache matches the key or any fallback, so CI
/// scripts can tell a cache miss from a failure.
pub const EXIT_CACHE_MISS: u8 = 3;

/// Caps glibc's malloc arenas for the mount daemon. Each thread that
/// allocates gets an arena of its own by default, and blocks freed by one
/// thread but allocated by another keep arenas resident: with the FUSE, tokio
/// and decode threads that tripled the daemon's peak RSS over its cache size
/// (358 MiB vs 158 MiB for a 64 MiB cache in tests/mount_memory.rs). Large
/// buffers stay in the heap (see below): fewer page faults per block.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        // Block buffers (1 MiB frames, GET bodies) come from the heap and are
        // reused there instead of each being a fresh mmap whose every page
        // faults in; up to 64 MiB freed at the top stays for the next ones.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
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
            source,
            ..
        } => return mount_parent(log_file.clone(), cli.global.json, source.key.clone()),
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
    let json = cli.global.json;
    let command = match &cli.command {
        Command::Restore { .. } => "restore",
        Command::Mount { .. } => "mount",
        _ => "",
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let (true, Some(LayoutError::NoMatch { key, .. })) =
                (json, e.downcast_ref::<LayoutError>())
            {
                report::print_json(&MissReport {
                    command,
                    matched: Matched::miss(key.clone()),
                });
            }
            ExitCode::from(exit_code_of(&e))
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(log_filter(default))
        .with_writer(std::io::stderr)
        .try_init();
}

/// cachemount's own events at `level`, others' warnings; RUST_LOG overrides.
/// aws-config's only at error: its credential chain warns once per provider
/// it tries (four long lines without credentials), and the store's own
/// error already says what is missing and how to provide it.
fn log_filter(level: &str) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("cachemount={level},aws_config=error,warn"))
    })
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
            let started = std::time::Instant::now();
            let store = open_store(&cli.global).await?;
            let specs = parse_specs(&paths, &anchors)?;
            let options = SaveOptions {
                archive: WriterOptions {
                    level,
                    ..WriterOptions::default()
                },
                overlays: cli.global.overlays(),
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
            let report = report::SaveReport {
                command: "save",
                key,
                digest: report.digest,
                entries: report.entries,
                archive_size: report.archive_size,
                uploaded: report.uploaded,
                unchanged: report.unchanged,
                reused_files: report.reused_files,
                reused_bytes: report.reused_bytes,
                bytes_uploaded: report.transfer.uploaded,
                bytes_copied: report.transfer.copied,
                bytes_downloaded: report.transfer.downloaded,
                seconds: started.elapsed().as_secs_f64(),
            };
            if cli.global.json {
                report::print_json(&report);
            } else {
                print!("{}", report.human());
            }
        }
        Command::Restore {
            source,
            paths,
            same_owner,
        } => {
            let started = std::time::Instant::now();
            let specs = parse_specs(&paths, &anchors)?;
            let options = ExtractOptions { same_owner };
            let progress = Progress::new("downloading", cli.global.quiet);
            let opened = open_source(&cli.global, source).await?;
            let src = Source {
                store: &opened.store,
                key: opened.object.clone(),
                content_addressed: opened.digest.is_some(),
                expected_digest: opened.digest.clone(),
                pointer: opened.pointer.clone(),
                refresh_after: cli.global.refresh_after(),
            };
            let disk = cli.global.disk_cache();
            let restored =
                restore::restore(src, &specs, &anchors, options, disk.as_ref(), progress).await?;
            let report = report::RestoreReport {
                command: "restore",
                matched: opened.matched,
                digest: opened.digest,
                archive_size: restored.archive_size,
                restored: restored.restored,
                bytes_downloaded: opened.store.transfer_counts().downloaded,
                disk_cache_files: restored.from_disk_files,
                disk_cache_bytes: restored.from_disk_bytes,
                seconds: started.elapsed().as_secs_f64(),
            };
            if cli.global.json {
                report::print_json(&report);
            } else {
                print!("{}", report.human());
            }
        }
        Command::Mount {
            source,
            paths,
            force,
            writable,
            cache_size,
            fuse_threads,
            daemon_child,
            spawned_at,
            passthrough,
            tuning,
            no_record,
            no_prefetch,
            ..
        } => {
            let options = MountOptions {
                recorder: (!no_record).then(Default::default),
                prefetch: !no_prefetch,
                force,
                cache_size,
                disk: cli.global.disk_cache(),
                passthrough,
                fetch: tuning.fetch_config(),
                fuse_threads,
                writable,
                overlays: cli.global.overlays(),
                read_ahead_kb: tuning.read_ahead_kb.unwrap_or(daemon::BDI_READ_AHEAD_KB),
                dev_fuse: cli.global.dev_fuse.clone(),
                mounted_key: None,
            };
            let phases = Phases::begin(spawned_at);
            let result = mount_and_serve(
                &cli.global,
                source,
                &paths,
                &anchors,
                options,
                daemon_child,
                phases,
            )
            .await;
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
            let mut daemons = Daemons::default();
            for p in &paths {
                let overlays = cli.global.overlays();
                let counters = mount_counters(&overlays, std::path::Path::new(p));
                match umount(&overlays, std::path::Path::new(p), lazy, keep_changes) {
                    Ok(kept) => {
                        match kept {
                            None => println!("unmounted {p}"),
                            Some(kept) => println!(
                                "unmounted {p}; its changes are kept in {}",
                                kept.display()
                            ),
                        }
                        if let Some(c) = counters {
                            println!("{}", report::umount_summary(&c));
                            daemons.unmounted(&c);
                        }
                    }
                    Err(e) => failed.push(e),
                }
            }
            daemons.wait();
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
        Command::Stats { path, format } => {
            // A writable mount's counters are on its read-only layer.
            let layer = cli
                .global
                .overlays()
                .find(&path)
                .map_or(path.clone(), |w| w.lower);
            let text = control::stats(&layer)?;
            let counters = crate::cache::stats::parse(&text);
            let path = preflight::absolute(&path);
            if cli.global.json {
                report::print_json(&report::stats_json(&path, &counters));
            } else if format == "prometheus" {
                print!("{}", report::stats_prometheus(&path, &counters));
            } else {
                print!("{text}");
            }
        }
        Command::Doctor => {
            let store = open_store(&cli.global).await.map_err(|e| format!("{e:#}"));
            let report = doctor::run(
                &cli.global.dev_fuse,
                &cli.global.overlays(),
                store.as_ref().map_err(Clone::clone),
            )
            .await;
            if cli.global.json {
                report::print_json(&report);
            } else {
                print!("{}", report.human());
            }
            if report.failed() {
                anyhow::bail!("some checks failed (see above)");
            }
        }
        Command::Report { key, path } => {
            let (subject, usage, builds) = match (key, path) {
                (Some(key), _) => {
                    let store = open_store(&cli.global).await?;
                    let (usage, builds) = key_usage(&store, &key).await?;
                    (report::Subject::Key(key), usage, Some(builds))
                }
                (None, Some(path)) => {
                    let layer = cli
                        .global
                        .overlays()
                        .find(&path)
                        .map_or(path.clone(), |w| w.lower);
                    let json = control::usage(&layer)?;
                    let usage = serde_json::from_str(&json)
                        .context("the mount's usage report is unreadable")?;
                    (
                        report::Subject::Path(preflight::absolute(&path)),
                        usage,
                        None,
                    )
                }
                (None, None) => unreachable!("clap requires --key or PATH"),
            };
            let report = report::UsageReport {
                command: "report",
                subject,
                builds,
                usage,
            };
            if cli.global.json {
                report::print_json(&report);
            } else {
                print!("{}", report.human());
            }
        }
        Command::Keys { prefix } => {
            let store = open_store(&cli.global).await?;
            let keys = layout::list_keys(&store, &prefix).await?;
            let now = layout::unix_now();
            let rows: Vec<report::KeyRow> = keys
                .into_iter()
                .map(|k| report::KeyRow {
                    age_seconds: now.saturating_sub(k.pointer.created),
                    key: k.key,
                    digest: k.pointer.digest,
                    size: k.pointer.size,
                    created: k.pointer.created,
                })
                .collect();
            if cli.global.json {
                report::print_json(&rows);
            } else {
                print!("{}", report::keys_human(&rows));
            }
        }
        Command::Cache { action } => {
            let Some(options) = cli.global.disk_cache() else {
                anyhow::bail!("the disk cache is turned off (--no-disk-cache)");
            };
            let cache = DiskCache::open(&options)?;
            match action {
                CacheAction::Stats => {
                    let summary = cache.summary();
                    if cli.global.json {
                        report::print_json(&summary);
                    } else {
                        print!("{}", report::disk_cache_human(&summary));
                    }
                }
                CacheAction::Clear => {
                    let (entries, bytes) = cache.clear()?;
                    if cli.global.json {
                        report::print_json(&serde_json::json!({
                            "command": "cache clear", "entries": entries, "bytes": bytes
                        }));
                    } else {
                        println!(
                            "removed {entries} entries ({bytes} bytes) from {}",
                            cache.dir().display()
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Unmounts `path`, both layers of a writable mount, whose changes are then
/// removed or (`keep_changes`) moved aside, to the returned path.
fn umount(
    overlays: &Overlays,
    path: &std::path::Path,
    lazy: bool,
    keep_changes: bool,
) -> anyhow::Result<Option<PathBuf>> {
    match overlays.find(path) {
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

/// The counters of the mount at `path` (its read-only layer for a writable
/// one), if it answers: read before it is unmounted, for the summary.
fn mount_counters(overlays: &Overlays, path: &std::path::Path) -> Option<Vec<(String, u64)>> {
    let layer = overlays.find(path).map_or(path.to_path_buf(), |w| w.lower);
    let text = control::stats(&layer).ok()?;
    Some(crate::cache::stats::parse(&text))
}

/// The daemons `umount` took mountpoints from: one whose every mountpoint
/// is gone is waited for, since it writes the access profile as it ends
/// (a CI job that ends right after `umount` would otherwise kill it first).
#[derive(Default)]
struct Daemons(std::collections::HashMap<u64, (u64, u64)>);

/// Longest `umount` waits for a daemon to write its profile and exit.
const DAEMON_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Daemons {
    fn unmounted(&mut self, counters: &[(String, u64)]) {
        let get = |name: &str| counters.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
        if let (Some(pid), Some(mountpoints)) = (get("daemon_pid"), get("mountpoints")) {
            let e = self.0.entry(pid).or_insert((mountpoints, 0));
            e.1 += 1;
        }
    }

    fn wait(self) {
        let deadline = std::time::Instant::now() + DAEMON_EXIT_WAIT;
        for (pid, (mountpoints, gone)) in self.0 {
            if gone < mountpoints || pid == 0 {
                continue;
            }
            while std::path::Path::new(&format!("/proc/{pid}")).exists()
                && !is_zombie(pid)
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// Whether `pid` has exited and waits to be reaped (its parent is gone or busy).
fn is_zombie(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// The usage of key `key`'s cache by the builds its access profile recorded,
/// and how many builds that is.
async fn key_usage(
    store: &AnyStore,
    key: &str,
) -> anyhow::Result<(crate::profile::usage::Usage, u32)> {
    let profile = crate::profile::load(store, key)
        .await?
        .with_context(|| format!("key {key:?} has no access profile yet: mount it (without --no-record), build, and unmount"))?;
    let resolved = layout::resolve(store, key, &[]).await?;
    let digest = resolved.pointer.digest.clone();
    let version = open_version(
        store,
        &resolved.pointer.blob_key(),
        Some(&digest),
        resolved.pointer.index_hint(),
        Refresh::Never,
        None,
    )
    .await?;
    let names = profile.entries.iter().map(|e| &*e.name);
    Ok((
        crate::profile::usage::usage(&version.index, names),
        profile.builds,
    ))
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
fn mount_parent(log_file: Option<PathBuf>, json: bool, key: Option<String>) -> ExitCode {
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
    let started = std::time::Instant::now();
    let result = control::spawn_daemon(&args, &log, new_log, std::time::Duration::from_secs(600))
        .and_then(|ready| {
            let mut report: MountReport = serde_json::from_str(&ready.report)
                .context("the mount daemon's readiness report is unreadable")?;
            report.pid = Some(ready.pid);
            report.log = Some(log.clone());
            report.seconds = started.elapsed().as_secs_f64();
            Ok(report)
        });
    match result {
        Ok(report) if json => {
            report::print_json(&report);
            ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{}", report.human());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = match e.downcast_ref::<control::DaemonFailed>() {
                Some(f) => f.code,
                None => 1,
            };
            if let (true, EXIT_CACHE_MISS, Some(key)) = (json, code, key) {
                report::print_json(&MissReport {
                    command: "mount",
                    matched: Matched::miss(key),
                });
            }
            ExitCode::from(code)
        }
    }
}

/// The daemon logs at info level to its log file (its stderr, or in the
/// foreground both stderr and the file).
fn init_mount_logging(verbose: u8, log_file: Option<&std::path::Path>, foreground: bool) {
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    let default = if verbose > 1 { "debug" } else { "info" };
    let file = match (foreground, log_file) {
        (true, Some(path)) => control::open_log(path, false).ok(),
        _ => None,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(log_filter(default))
        .with_ansi(false);
    let _ = match file {
        Some(f) => builder
            .with_writer(std::io::stderr.and(std::sync::Arc::new(f)))
            .try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// What `--key` (through its fallbacks) or a URL names, in its store.
struct Opened {
    store: AnyStore,
    /// The object to read.
    object: String,
    /// The blob's digest when it came from a key (content-addressed); None
    /// for a URL, whose object may be overwritten with other content.
    digest: Option<String>,
    /// Where its index lies, as the key pointer says (a hint).
    index_hint: Option<std::ops::Range<u64>>,
    /// The key pointer that led to it, whose lifetime is refreshed with the blob's.
    pointer: Option<String>,
    /// What the user asked for and what answered it.
    matched: Matched,
    /// How long building the store client took (a mount's first start-up phase).
    store_time: std::time::Duration,
}

/// Resolves `--key` (or a fallback) or the URL into the object to read.
async fn open_source(global: &GlobalArgs, source: SourceArgs) -> anyhow::Result<Opened> {
    if let Some(url) = source.url {
        let (store_url, object) = split_object_url(&url)?;
        let started = std::time::Instant::now();
        let store = open_store_at(global, &store_url)
            .await
            .with_context(|| format!("cannot open {url}"))?;
        return Ok(Opened {
            store,
            store_time: started.elapsed(),
            object,
            digest: None,
            index_hint: None,
            pointer: None,
            matched: Matched {
                key: url.clone(),
                matched_key: Some(url),
                hit: Hit::Exact,
            },
        });
    }
    let key = source.key.expect("clap requires --key or a URL");
    let started = std::time::Instant::now();
    let store = open_store(global).await?;
    let store_time = started.elapsed();
    let resolved = layout::resolve(&store, &key, &source.fallbacks).await?;
    let hit = if resolved.key == key {
        Hit::Exact
    } else {
        Hit::Fallback
    };
    Ok(Opened {
        pointer: Some(layout::pointer_key(&resolved.key)?),
        object: resolved.pointer.blob_key(),
        digest: Some(resolved.pointer.digest.clone()),
        index_hint: resolved.pointer.index_hint(),
        store,
        store_time,
        matched: Matched {
            key,
            matched_key: Some(resolved.key),
            hit,
        },
    })
}

/// Resolves the cache, opens it, mounts every path, reports readiness and
/// serves until unmounted.
async fn mount_and_serve(
    global: &GlobalArgs,
    source: SourceArgs,
    paths: &[String],
    anchors: &Anchors,
    mut options: MountOptions,
    daemon_child: bool,
    mut phases: Phases,
) -> anyhow::Result<()> {
    let specs = parse_specs(paths, anchors)?;
    let signals = daemon::Signals::register().context("cannot handle signals")?;
    let asked_key = source.key.clone();
    let Opened {
        store,
        object: key,
        digest,
        index_hint,
        pointer,
        matched,
        store_time,
    } = open_source(global, source).await?;
    let what = matched.describe();
    phases.mark_parts(&[("store client, credentials", store_time)], "key pointer");
    let store = std::sync::Arc::new(store);
    // The key the archive was found under (a URL mount has none).
    options.mounted_key = asked_key.as_ref().and(matched.matched_key.clone());
    // A key mount learns: its profile loads while the archive opens.
    let learn_keys = asked_key
        .zip(options.mounted_key.clone())
        .map(|(key, matched)| crate::mount::learn::LearnKeys { key, matched });
    // Only a key's profile is replayed (and only a key's blob never changes
    // content, which handing pages to the kernel needs).
    options.prefetch &= learn_keys.is_some();
    let loading = learn_keys
        .as_ref()
        .filter(|_| options.prefetch)
        .map(|k| crate::mount::learn::load_profile(store.clone(), k));
    let recorder = options.recorder.clone();
    let stats = std::sync::Arc::new(Stats::default());
    let refresh = Refresh::After(global.refresh_after());
    let version = open_version(
        &*store,
        &key,
        digest.as_deref(),
        index_hint,
        refresh,
        Some(&stats),
    )
    .await?;
    let files = version
        .index
        .entries
        .iter()
        .filter(|e| e.kind == crate::archive::EntryKind::File)
        .count();
    Stats::add(&stats.files_archived, files as u64);
    Stats::add(&stats.daemon_pid, u64::from(std::process::id()));
    let (report_digest, archive_size) = (digest.clone(), version.size);
    let t = version.opened;
    phases.mark_parts(
        &[
            ("tail GET", t.tail),
            ("index GETs", t.gets),
            ("index decode", t.decode),
        ],
        "open (other)",
    );
    tracing::info!(
        "opened {key} ({} entries, {} range GETs) in {} ms",
        version.index.entries.len(),
        t.requests,
        phases.elapsed().as_millis()
    );
    let targets = crate::paths::plan_targets(&version.index, &specs, anchors)?;
    for t in &targets {
        t.check_mountable()?;
    }
    phases.mark("plan targets");
    let runtime = tokio::runtime::Handle::current();
    let daemon_store = store.clone();
    let daemon_stats = stats.clone();
    let (d, mut phases) = tokio::task::spawn_blocking(move || {
        daemon::mount_all(
            daemon_store,
            version,
            digest,
            &targets,
            &options,
            daemon_stats,
            runtime,
            &mut phases,
        )
        .map(|d| (d, phases))
    })
    .await??;
    Stats::add(&stats.mountpoints, d.mounted.len() as u64);
    if let Some(loading) = loading {
        crate::mount::learn::spawn_replay(
            d.fetcher().clone(),
            d.current().clone(),
            loading,
            d.warmed(),
        );
    }
    let report = MountReport {
        command: "mount".into(),
        matched,
        digest: report_digest,
        archive_size,
        mounts: d
            .mounted
            .iter()
            .map(|m| MountedPath {
                path: m.path.clone(),
                entries: m.nodes as u64,
                mode: m.mode().into(),
            })
            .collect(),
        pid: None,
        log: None,
        seconds: phases.elapsed().as_secs_f64(),
    };
    if daemon_child {
        let json = serde_json::to_string(&report).expect("reports serialise");
        let out = control::protocol_line("ready", &[&json]);
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
    } else if global.json {
        report::print_json(&report);
    } else {
        print!("{}", report.human());
    }
    phases.mark("report");
    for m in &d.mounted {
        tracing::info!(
            "serving {what} at {} ({} entries); ready {} ms after start",
            m.path.display(),
            m.nodes,
            phases.elapsed().as_millis()
        );
    }
    phases.log();
    // The key pointer's lifetime too (the blob's was refreshed by
    // open_version), off the start-up path: best effort either way.
    if let Some(pointer) = pointer {
        let (store, after) = (store.clone(), global.refresh_after());
        tokio::spawn(async move { refresh_lifetime(&*store, &pointer, after).await });
    }
    d.serve(signals).await?;
    if let (Some(keys), Some(recorder)) = (&learn_keys, &recorder) {
        crate::mount::learn::write_profile(&*store, keys, recorder).await;
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
