//! The command line's grammar: the commands, their flags and the
//! environment variables behind them (clap's `env`), and the value parsers
//! whose errors name the variable. Nothing here runs a command.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::cache::disk::DiskOptions;
use crate::cache::version::REFRESH_AFTER;
use crate::cache::FetchConfig;
use crate::mount::overlay::{OverlayKind, Overlays};
use crate::mount::preflight;
use crate::store::s3::RetryPolicy;

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
    /// Print the result as one JSON object on stdout (an array for `keys`):
    /// the key asked for, the key matched, the hit kind, the figures.
    #[arg(long, global = true)]
    pub json: bool,
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
    /// Where writable mounts keep their layers and changes (default: under
    /// the user's cache directory, cachemount/writable).
    #[arg(long, global = true, env = "CACHEMOUNT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// The overlay of writable mounts: fuse-overlayfs or kernel (default:
    /// kernel overlayfs as root, fuse-overlayfs otherwise).
    #[arg(long, global = true, hide = true, env = "CACHEMOUNT_OVERLAY", value_parser = NamingTheVariable(parse_overlay))]
    pub overlay: Option<OverlayKind>,
    /// The FUSE device (tests of the error path name a missing one).
    #[arg(long, global = true, hide = true, env = "CACHEMOUNT_DEV_FUSE", default_value = preflight::DEV_FUSE)]
    pub dev_fuse: PathBuf,
    /// The disk cache shared by every mount and restore on this host
    /// (default: the user's cache dir, cachemount/blocks).
    #[arg(long, global = true, env = "CACHEMOUNT_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Bound of the disk cache, in bytes (K, M, G suffixes); it never takes
    /// more than half the free space of its file system either.
    #[arg(long, global = true, env = "CACHEMOUNT_DISK_CACHE_SIZE", default_value = "10G", value_parser = NamingTheVariable(parse_size))]
    pub disk_cache_size: u64,
    /// Use no disk cache: every mount and restore fetches from the store.
    #[arg(long, global = true, env = "CACHEMOUNT_NO_DISK_CACHE")]
    pub no_disk_cache: bool,
}

impl GlobalArgs {
    pub(super) fn overlays(&self) -> Overlays {
        Overlays::new(self.state_dir.clone(), self.overlay)
    }

    /// Where the disk cache is and its bound, unless it is turned off.
    pub(super) fn disk_cache(&self) -> Option<DiskOptions> {
        if self.no_disk_cache {
            return None;
        }
        let dir = self
            .cache_dir
            .clone()
            .or_else(|| Some(dirs::cache_dir()?.join("cachemount").join("blocks")))?;
        Some(DiskOptions {
            dir,
            max_bytes: self.disk_cache_size,
        })
    }

    pub(super) fn refresh_after(&self) -> Duration {
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
        #[arg(long, env = "CACHEMOUNT_CACHE_SIZE", default_value = "1G", value_parser = NamingTheVariable(parse_size))]
        cache_size: u64,
        /// The daemon's log file (default: under the user's cache dir; printed).
        #[arg(long)]
        log_file: Option<PathBuf>,
        /// FUSE worker threads per mountpoint.
        #[arg(long, default_value_t = 4, hide = true)]
        fuse_threads: usize,
        /// Do not record what the build reads: no access profile is written
        /// when the mount ends.
        #[arg(long, env = "CACHEMOUNT_NO_RECORD", value_parser = clap::builder::FalseyValueParser::new())]
        no_record: bool,
        /// Do not prefetch what the key's access profile says the last builds read.
        #[arg(long, env = "CACHEMOUNT_NO_PREFETCH", value_parser = clap::builder::FalseyValueParser::new())]
        no_prefetch: bool,
        /// Internal: this process is the daemon `mount` started.
        #[arg(long, hide = true)]
        daemon_child: bool,
        /// Internal: when `mount` spawned this daemon (ns since the epoch).
        #[arg(long, hide = true)]
        spawned_at: Option<u64>,
        /// Open files wholly in the disk cache with FUSE passthrough (the
        /// kernel reads the cache file itself). Off by default: answering
        /// `open` costs small-file walks more than it saves, and concurrent
        /// opens under passthrough still fail with EIO (see README).
        #[arg(long, env = "CACHEMOUNT_PASSTHROUGH")]
        passthrough: bool,
        #[command(flatten)]
        tuning: TuningArgs,
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
        /// `text` (one `name value` line per counter) or `prometheus` (the
        /// text exposition format, for node_exporter's textfile collector).
        #[arg(long, default_value = "text", value_parser = ["text", "prometheus"])]
        format: String,
    },
    /// Check what works on this machine: FUSE, the overlay for --writable,
    /// FUSE passthrough, the store and its credentials. Exits 1 when a check fails.
    Doctor,
    /// What builds use of a cache: files and bytes read against those
    /// archived, the largest directories no recorded build read, and
    /// suggested excludes. From the key's access profile (--key), or from
    /// what a live mount has read so far (PATH).
    Report {
        /// The cache key whose access profile to report on.
        #[arg(long, required_unless_present = "path", conflicts_with = "path")]
        key: Option<String>,
        /// A mounted path (the root of a live mount).
        path: Option<PathBuf>,
    },
    /// List the keys in the store: key, size, age, digest.
    Keys {
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// The disk cache shared by the mounts on this host (--cache-dir).
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
}

#[derive(Subcommand, Debug, Clone, Copy)]
pub enum CacheAction {
    /// Its size, entries, bound and hit figures (of every process that used it).
    Stats,
    /// Delete every entry (nothing else in the dir).
    Clear,
}

/// Tuning of the mount, for tests and benchmarks: hidden, usually set by
/// their variables (the daemon child inherits them); unset keeps the
/// library's default. A malformed value is refused, naming the variable.
#[derive(Args, Debug)]
pub struct TuningArgs {
    /// Largest merged range GET, in bytes.
    #[arg(long, hide = true, env = "CACHEMOUNT_MAX_GET", value_parser = NamingTheVariable(parse_count::<u64>))]
    max_get: Option<u64>,
    /// The largest read-ahead window, in blocks.
    #[arg(long, hide = true, env = "CACHEMOUNT_READAHEAD_BLOCKS", value_parser = NamingTheVariable(parse_count::<u32>))]
    readahead_blocks: Option<u32>,
    /// How far ahead of a sequential reader its read-ahead reaches, in
    /// milliseconds at the rate it reads.
    #[arg(long, hide = true, env = "CACHEMOUNT_READAHEAD_HORIZON_MS", value_parser = NamingTheVariable(parse_count::<u64>))]
    readahead_horizon_ms: Option<u64>,
    /// Compressed bytes of neighbours fetched along with a small file's miss.
    #[arg(long, hide = true, env = "CACHEMOUNT_NEIGHBOUR_BYTES", value_parser = NamingTheVariable(parse_count::<u64>))]
    neighbour_bytes: Option<u64>,
    /// The kernel read-ahead set on each mount, in KiB.
    #[arg(long, hide = true, env = "CACHEMOUNT_READ_AHEAD_KB", value_parser = NamingTheVariable(parse_count::<u32>))]
    pub read_ahead_kb: Option<u32>,
}

impl TuningArgs {
    pub(super) fn fetch_config(&self) -> FetchConfig {
        let default = FetchConfig::default();
        FetchConfig {
            max_get: self.max_get.unwrap_or(default.max_get),
            readahead_max_blocks: self
                .readahead_blocks
                .unwrap_or(default.readahead_max_blocks),
            readahead_horizon: self
                .readahead_horizon_ms
                .map_or(default.readahead_horizon, std::time::Duration::from_millis),
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

/// `fuse-overlayfs` or `kernel`.
fn parse_overlay(s: &str) -> Result<OverlayKind, String> {
    match s.trim() {
        "fuse-overlayfs" => Ok(OverlayKind::FuseOverlayfs),
        "kernel" => Ok(OverlayKind::Kernel),
        _ => Err("expected fuse-overlayfs or kernel".into()),
    }
}

/// A whole number (of bytes, blocks or KiB).
fn parse_count<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.trim()
        .parse()
        .map_err(|_| "expected a whole number".into())
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
