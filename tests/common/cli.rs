//! Test support: running the real `cachemount` binary as a user would, in a
//! sandbox of its own (working dir and HOME under a temp dir, a local store).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A working dir, a HOME and a store, all under one temp dir.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    /// `--store` value (a local directory unless replaced).
    pub store: String,
    /// Extra environment for every command.
    pub env: Vec<(String, String)>,
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
        }
    }

    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachemount"));
        cmd.current_dir(self.work())
            .env("HOME", self.home())
            .env("CACHEMOUNT_STORE", &self.store)
            .args(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `cachemount ARGS`, returning its output whatever the exit status.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
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
