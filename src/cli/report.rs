//! What each command reports, as data: one struct per command, printed as
//! the human lines or, with `--json`, as one JSON object (an array for
//! `keys`) on stdout, so that CI glue (the Buildkite plugin, the GitHub
//! Action) reads the hit kind, the matched key and the figures without
//! parsing prose. `stats` also speaks Prometheus's text format.
//!
//! The field names are an interface: add fields, never rename them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{human_age, human_bytes};

/// How the asked-for key was answered: `exact` (the key itself), `fallback`
/// (a key found under a fallback prefix) or `miss` (nothing). An archive
/// named by URL is an exact hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hit {
    Exact,
    Fallback,
    Miss,
}

/// The key asked for and what answered it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Matched {
    /// The `--key` given (or the archive URL).
    pub key: String,
    /// The key whose cache was used: `key`, or the fallback's; null on a miss.
    pub matched_key: Option<String>,
    pub hit: Hit,
}

impl Matched {
    pub fn miss(key: String) -> Self {
        Matched {
            key,
            matched_key: None,
            hit: Hit::Miss,
        }
    }

    /// `KEY`, or `MATCHED (fallback for KEY)`, as the human lines say it.
    pub fn describe(&self) -> String {
        match (&self.matched_key, self.hit) {
            (Some(m), Hit::Fallback) => format!("{m} (fallback for {})", self.key),
            _ => self.key.clone(),
        }
    }
}

/// Printed by a command that found no cache (exit code 3), with `--json`.
#[derive(Debug, Serialize)]
pub struct MissReport<'a> {
    pub command: &'a str,
    #[serde(flatten)]
    pub matched: Matched,
}

#[derive(Debug, Serialize)]
pub struct SaveReport {
    pub command: &'static str,
    pub key: String,
    pub digest: String,
    pub entries: usize,
    pub archive_size: u64,
    /// False when the store already had this content (nothing uploaded).
    pub uploaded: bool,
    /// Nothing changed since the writable mount's cache: only the key was written.
    pub unchanged: bool,
    pub reused_files: usize,
    pub reused_bytes: u64,
    pub bytes_uploaded: u64,
    pub bytes_copied: u64,
    pub bytes_downloaded: u64,
    pub seconds: f64,
}

impl SaveReport {
    pub fn human(&self) -> String {
        let how = if self.unchanged {
            "unchanged since it was mounted: only the key was written".to_string()
        } else if !self.uploaded {
            "already in the store, not uploaded".to_string()
        } else if self.reused_files > 0 {
            format!(
                "incremental: {} unchanged files ({}) reused from the mounted cache",
                self.reused_files,
                human_bytes(self.reused_bytes)
            )
        } else {
            "uploaded".to_string()
        };
        format!(
            "saved {}: {} entries, {} archive sha256:{} ({how})\n\
             transferred: {} bytes uploaded, {} bytes copied inside the store, {} bytes downloaded; archive {} bytes\n",
            self.key,
            self.entries,
            human_bytes(self.archive_size),
            self.digest,
            self.bytes_uploaded,
            self.bytes_copied,
            self.bytes_downloaded,
            self.archive_size
        )
    }
}

#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub command: &'static str,
    #[serde(flatten)]
    pub matched: Matched,
    /// The blob's digest (null for an archive named by URL).
    pub digest: Option<String>,
    pub archive_size: u64,
    pub restored: Vec<PathBuf>,
    pub bytes_downloaded: u64,
    /// Files (and their bytes) copied from the host's disk cache.
    pub disk_cache_files: u64,
    pub disk_cache_bytes: u64,
    pub seconds: f64,
}

impl RestoreReport {
    pub fn human(&self) -> String {
        let paths: Vec<String> = self
            .restored
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let from_disk = match self.disk_cache_files {
            0 => String::new(),
            n => format!(
                "; {n} files ({}) from the disk cache, {} downloaded",
                human_bytes(self.disk_cache_bytes),
                human_bytes(self.bytes_downloaded)
            ),
        };
        format!(
            "restored {} ({}) into {}{from_disk}\n",
            self.matched.describe(),
            human_bytes(self.archive_size),
            paths.join(", ")
        )
    }
}

/// One mounted path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountedPath {
    pub path: PathBuf,
    /// Files, directories and symlinks under it.
    pub entries: u64,
    /// `read-only` or `writable`.
    pub mode: String,
}

/// What the mount daemon reports when every path answers; it travels to
/// `cachemount mount` in the readiness protocol, which adds `pid` and `log`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountReport {
    pub command: String,
    #[serde(flatten)]
    pub matched: Matched,
    pub digest: Option<String>,
    pub archive_size: u64,
    pub mounts: Vec<MountedPath>,
    /// The daemon's pid and log file (null in the foreground).
    pub pid: Option<u32>,
    pub log: Option<PathBuf>,
    /// From the start of the command until every path answered.
    pub seconds: f64,
}

impl MountReport {
    pub fn human(&self) -> String {
        let mut out = String::new();
        for m in &self.mounts {
            out += &format!(
                "mounted {} at {} ({} entries, {})\n",
                self.matched.describe(),
                m.path.display(),
                m.entries,
                m.mode
            );
        }
        if let (Some(pid), Some(log)) = (self.pid, &self.log) {
            out += &format!("daemon pid {pid}, log {}\n", log.display());
        }
        out
    }
}

/// One row of `keys`.
#[derive(Debug, Serialize)]
pub struct KeyRow {
    pub key: String,
    pub digest: String,
    pub size: u64,
    /// When it was saved, in seconds since the Unix epoch.
    pub created: u64,
    pub age_seconds: u64,
}

pub fn keys_human(rows: &[KeyRow]) -> String {
    let mut out = format!("{:<40} {:>10} {:>8}  DIGEST\n", "KEY", "SIZE", "AGE");
    for k in rows {
        out += &format!(
            "{:<40} {:>10} {:>8}  {}\n",
            k.key,
            human_bytes(k.size),
            human_age(k.age_seconds),
            &k.digest[..k.digest.len().min(16)]
        );
    }
    out
}

/// `stats --json`: the mount's path and every counter.
pub fn stats_json(path: &std::path::Path, counters: &[(String, u64)]) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    map.insert("command".into(), "stats".into());
    map.insert("path".into(), path.display().to_string().into());
    for (name, value) in counters {
        map.insert(name.clone(), (*value).into());
    }
    serde_json::Value::Object(map)
}

/// Counters that are levels, not totals.
const GAUGES: &[&str] = &[
    "cache_bytes",
    "cache_capacity",
    "reopen_max_ms",
    "files_archived",
    "recording",
    "daemon_pid",
    "mountpoints",
];

/// `stats --format prometheus`: the text exposition format, one
/// `cachemount_<counter>{mount="<path>"}` sample per counter, as
/// node_exporter's textfile collector reads it.
pub fn stats_prometheus(path: &std::path::Path, counters: &[(String, u64)]) -> String {
    let label = path
        .display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    let mut out = String::new();
    for (name, value) in counters {
        let kind = if GAUGES.contains(&name.as_str()) {
            "gauge"
        } else {
            "counter"
        };
        out += &format!("# TYPE cachemount_{name} {kind}\n");
        out += &format!("cachemount_{name}{{mount=\"{label}\"}} {value}\n");
    }
    out
}

/// Prints `report` as one line of JSON on stdout.
/// `cache stats`: one `name value` line each, like a mount's `stats`.
pub fn disk_cache_human(s: &crate::cache::disk::Summary) -> String {
    let f = &s.figures;
    format!(
        "dir {}\nbytes {}\nentries {}\nlimit {}\nhits {}\nmisses {}\ninserts {}\nevicted {}\ndamaged {}\n",
        s.dir.display(),
        s.bytes,
        s.entries,
        s.limit,
        f.hits,
        f.misses,
        f.inserts,
        f.evicted,
        f.damaged
    )
}

pub fn print_json(report: &impl Serialize) {
    println!(
        "{}",
        serde_json::to_string(report).expect("reports serialise")
    );
}

/// What a usage report is about.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Subject {
    /// A key's access profile.
    Key(String),
    /// A live mount's reads so far.
    Path(PathBuf),
}

/// `report`: what builds use of a cache (see `profile::usage`).
#[derive(Debug, Clone, Serialize)]
pub struct UsageReport {
    pub command: &'static str,
    #[serde(flatten)]
    pub subject: Subject,
    /// Builds the key's profile merges (null for a live mount: this one).
    pub builds: Option<u32>,
    #[serde(flatten)]
    pub usage: crate::profile::usage::Usage,
}

impl UsageReport {
    pub fn human(&self) -> String {
        let u = &self.usage;
        let by = match self.builds {
            Some(1) => "the last build".to_string(),
            Some(n) => format!("the last {n} builds"),
            None => "this mount".to_string(),
        };
        let mut out = format!(
            "{by} read {} of {} files ({}), {} of {} ({})\n",
            thousands(u.files_read),
            thousands(u.files_archived),
            percent(u.files_read, u.files_archived),
            human_bytes(u.bytes_read),
            human_bytes(u.bytes_archived),
            percent(u.bytes_read, u.bytes_archived),
        );
        if !u.unread_dirs.is_empty() {
            out += &format!("largest directories {by} never read:\n");
            for d in &u.unread_dirs {
                out += &format!(
                    "  {}: 0 of {} files, {}\n",
                    d.path,
                    thousands(d.files),
                    human_bytes(d.bytes)
                );
            }
        }
        if !u.suggested_excludes.is_empty() {
            out += &format!(
                "suggested excludes (save without them): {}\n",
                u.suggested_excludes.join(" ")
            );
        }
        out
    }
}

/// The line `umount` prints for a mount, from its counters: read N of M
/// files (X%), Y from the store, Z% prefetch hits (of the blocks first read,
/// those a prefetch had brought in).
pub fn umount_summary(counters: &[(String, u64)]) -> String {
    let get = |name: &str| {
        counters
            .iter()
            .find(|(k, _)| k == name)
            .map_or(0, |(_, v)| *v)
    };
    let (read, files) = (get("files_read"), get("files_archived"));
    let hits = get("readahead_hits") + get("replay_hits");
    // Files read are counted by the recorder: without it, say so rather than 0.
    let files_read = if get("recording") == 1 {
        format!(
            "read {} of {} files ({})",
            thousands(read),
            thousands(files),
            percent(read, files)
        )
    } else {
        format!(
            "{} files (reads not recorded: --no-record)",
            thousands(files)
        )
    };
    format!(
        "{files_read}, {} from the store, {} prefetch hits",
        human_bytes(get("bytes_fetched")),
        percent(hits, hits + get("cache_misses")),
    )
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "0%".into();
    }
    format!("{:.1}%", part as f64 * 100.0 / whole as f64)
}

/// `3961` → `3,961`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fallback_hit_names_both_keys_and_its_kind() {
        let m = Matched {
            key: "deps-v2-abc".into(),
            matched_key: Some("deps-v2-old".into()),
            hit: Hit::Fallback,
        };
        let json = serde_json::to_value(MissReport {
            command: "restore",
            matched: m.clone(),
        })
        .unwrap();
        assert_eq!(json["hit"], "fallback");
        assert_eq!(json["key"], "deps-v2-abc");
        assert_eq!(json["matched_key"], "deps-v2-old");
        assert_eq!(m.describe(), "deps-v2-old (fallback for deps-v2-abc)");
        let miss = serde_json::to_value(MissReport {
            command: "mount",
            matched: Matched::miss("k".into()),
        })
        .unwrap();
        assert_eq!(miss["hit"], "miss");
        assert!(miss["matched_key"].is_null());
    }

    #[test]
    fn the_umount_line_counts_files_read_only_when_they_were_recorded() {
        let counters = |recording: u64| -> Vec<(String, u64)> {
            [
                ("files_archived", 40_000),
                ("files_read", 0),
                ("recording", recording),
                ("bytes_fetched", 3 << 20),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
        };
        assert_eq!(
            umount_summary(&counters(1)),
            "read 0 of 40,000 files (0.0%), 3.0 MiB from the store, 0% prefetch hits"
        );
        assert_eq!(
            umount_summary(&counters(0)),
            "40,000 files (reads not recorded: --no-record), 3.0 MiB from the store, 0% prefetch hits"
        );
    }

    #[test]
    fn prometheus_samples_are_typed_and_labelled_by_mount() {
        let text = stats_prometheus(
            std::path::Path::new("/w/node \"modules\""),
            &[("requests".into(), 7), ("cache_bytes".into(), 1024)],
        );
        assert_eq!(
            text,
            "# TYPE cachemount_requests counter\n\
             cachemount_requests{mount=\"/w/node \\\"modules\\\"\"} 7\n\
             # TYPE cachemount_cache_bytes gauge\n\
             cachemount_cache_bytes{mount=\"/w/node \\\"modules\\\"\"} 1024\n"
        );
    }
}
