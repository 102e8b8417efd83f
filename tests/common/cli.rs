//! Test support: running the real `cachemount` binary as a user would, in a
//! sandbox of its own (working dir and HOME under a temp dir, a local store).
//! Every command runs under a time limit ([`COMMAND_TIMEOUT`], or one given):
//! a hung `save`, `restore`, `keys` or `umount` fails its test, not CI.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long one command may take in a test (a save or restore of a few
/// hundred MB through a fault proxy included). nextest's per-test limit
/// (.config/nextest.toml) is the outer bound.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs `cmd` (stdin closed), killing it after `timeout` (then panicking).
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut v);
        v
    });
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = err_thread.join().unwrap_or_default();
            panic!(
                "{cmd:?} did not finish within {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
    }
}

/// A working dir, a HOME and a store, all under one temp dir.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    /// `--store` value (a local directory unless replaced).
    pub store: String,
    /// Extra environment for every command.
    pub env: Vec<(String, String)>,
    /// Variables removed from every command's environment.
    pub unset: Vec<String>,
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("work")).unwrap();
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        let store = dir.path().join("store").display().to_string();
        Sandbox {
            dir,
            store,
            env: Vec::new(),
            unset: Vec::new(),
        }
    }

    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// The sandbox's disk cache dir (`CACHEMOUNT_CACHE_DIR`).
    pub fn disk_cache(&self) -> PathBuf {
        self.dir.path().join("disk-cache")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachemount"));
        cmd.current_dir(self.work())
            .env("HOME", self.home())
            .env("CACHEMOUNT_STORE", &self.store)
            // Each sandbox its own disk cache: no test sees another's blocks.
            .env("CACHEMOUNT_CACHE_DIR", self.disk_cache())
            .args(args);
        for k in &self.unset {
            cmd.env_remove(k);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `cachemount ARGS`, returning its output whatever the exit status
    /// (within [`COMMAND_TIMEOUT`]).
    pub fn run(&self, args: &[&str]) -> Output {
        run_bounded(self.command(args), COMMAND_TIMEOUT)
    }

    /// The one short-retry environment: S3 bounds of seconds instead of
    /// minutes (1 s to headers and between body bytes, 2 attempts, 4 s per
    /// read), so a test of a permanent fault fails fast.
    pub fn short_retries(&mut self) {
        for (k, v) in [
            ("CACHEMOUNT_S3_READ_TIMEOUT", "1"),
            ("CACHEMOUNT_S3_ATTEMPTS", "2"),
            ("CACHEMOUNT_S3_STALL_TIMEOUT", "1"),
            ("CACHEMOUNT_S3_READ_DEADLINE", "4"),
        ] {
            self.env.push((k.into(), v.into()));
        }
    }

    /// Like [`Sandbox::run`], with another time limit.
    pub fn run_within(&self, args: &[&str], timeout: Duration) -> Output {
        run_bounded(self.command(args), timeout)
    }

    /// Runs `cachemount ARGS` and panics (showing stderr) unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "cachemount {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `cachemount ARGS`, expects failure, returns stderr.
    pub fn fails(&self, args: &[&str]) -> (i32, String) {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "cachemount {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Sandbox {
    /// Runs `cachemount ARGS`, expects exit `code` and stderr holding exactly
    /// one `error:` line (the README's promise), which contains `message`;
    /// returns that line.
    pub fn fails_with(&self, args: &[&str], code: i32, message: &str) -> String {
        let (got, err) = self.fails(args);
        assert_eq!(got, code, "cachemount {args:?}: exit {got}: {err}");
        error_line(&err, message)
    }
}

/// The one `error:` line of `stderr`, which must contain `message`.
pub fn error_line(stderr: &str, message: &str) -> String {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error: line, got: {stderr}");
    assert!(
        errors[0].contains(message),
        "expected {message:?} in the error line: {stderr}"
    );
    errors[0].to_string()
}

/// The blob files in a local store.
pub fn local_blobs(store: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(store.join("blobs/sha256")) {
        Ok(rd) => rd
            .map(|e| e.unwrap().path())
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect(),
        Err(_) => Vec::new(),
    }
}
