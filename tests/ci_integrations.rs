//! The Buildkite plugin and the GitHub Action, run for real: the hooks and
//! the action's scripts drive the real binary, against the local store and
//! SeaweedFS, with FUSE and through the restore fallback without it. The CI
//! system is faked only where it must be: its variables, a recording
//! `buildkite-agent` on PATH, temp files for `GITHUB_OUTPUT`/`GITHUB_STATE`/
//! `GITHUB_STEP_SUMMARY`, and the agent's carrying of a hook's exports to the
//! next hook (one shell runs the job).
//!
//! Each scenario: a first job misses and saves; a second hits exactly and
//! does not save; a third, with a new key, hits the fallback and saves; a
//! failed command saves nothing and still unmounts.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::cli::Sandbox;
use common::mount as mount_support;
use common::s3::TestS3;
use mount_support::{fuse_available, is_mounted, run_bounded};

const JOB_TIMEOUT: Duration = Duration::from_secs(180);

/// The checkout under test. Read at run time: a target dir reused across
/// checkouts (CI's, under /var/cache) may hold a test binary built in another
/// one, whose compile-time path is gone.
fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// A directory with `cachemount` and a recording `buildkite-agent`, first on PATH.
fn tools(sb: &Sandbox) -> PathBuf {
    let bin = sb.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_cachemount"), bin.join("cachemount")).unwrap();
    let agent = bin.join("buildkite-agent");
    std::fs::write(
        &agent,
        "#!/bin/bash\nprintf '%s\\0' \"$@\" >> \"$BK_RECORD\"\nprintf '\\n' >> \"$BK_RECORD\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    bin
}

fn base_command(sb: &Sandbox, program: &str) -> Command {
    let mut cmd = Command::new(program);
    let path = format!(
        "{}:{}",
        sb.dir.path().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    cmd.current_dir(sb.work())
        .env("HOME", sb.home())
        .env("CACHEMOUNT_STORE", &sb.store)
        .env("PATH", path);
    for (k, v) in &sb.env {
        cmd.env(k, v);
    }
    cmd
}

/// One Buildkite job: pre-command, the command, post-command, in one shell
/// as the agent runs them. Returns stdout+stderr and the annotations made.
fn buildkite_job(sb: &Sandbox, key: &str, command: &str) -> (String, Vec<Vec<String>>) {
    let hooks = repo().join("integrations/buildkite/hooks");
    let record = tempfile::NamedTempFile::new_in(sb.dir.path())
        .unwrap()
        .into_temp_path();
    let script = format!(
        "set -euo pipefail\n\
         source {hooks}/pre-command\n\
         set +e\n( {command} )\nexport BUILDKITE_COMMAND_EXIT_STATUS=$?\nset -e\n\
         source {hooks}/post-command\n",
        hooks = hooks.display()
    );
    let mut cmd = base_command(sb, "bash");
    cmd.arg("-c")
        .arg(script)
        .env("BK_RECORD", &record)
        .env("BUILDKITE_PLUGIN_CACHEMOUNT_KEY", key)
        .env("BUILDKITE_PLUGIN_CACHEMOUNT_PATHS_0", "deps")
        .env("BUILDKITE_PLUGIN_CACHEMOUNT_FALLBACK_0", "deps-")
        .env("BUILDKITE_PLUGIN_CACHEMOUNT_WRITABLE", "true");
    let out = run_bounded(cmd, JOB_TIMEOUT);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the job must not fail: {text}");
    let annotations = std::fs::read(&record)
        .unwrap_or_default()
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .collect();
    (text, annotations)
}

fn keys(sb: &Sandbox) -> Vec<String> {
    let out = sb.ok(&["--json", "keys"]);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap().to_string())
        .collect()
}

/// The content a key holds at deps/a.txt, restored in a fresh sandbox.
fn saved_text(sb: &Sandbox, key: &str) -> String {
    let mut other = Sandbox::new();
    other.store = sb.store.clone();
    other.env = sb.env.clone();
    other.ok(&["restore", "--key", key]);
    std::fs::read_to_string(other.work().join("deps/a.txt")).unwrap()
}

fn s3_sandbox(test: &str) -> Option<Sandbox> {
    Some(TestS3::from_env(test)?.sandbox())
}

fn without_fuse(sb: &mut Sandbox) {
    sb.env
        .push(("CACHEMOUNT_DEV_FUSE".into(), "/nonexistent/fuse".into()));
}

fn buildkite_scenario(sb: &Sandbox, mounted: bool) {
    tools(sb);
    let deps = sb.work().join("deps");
    let how = if mounted { "mounted" } else { "restored" };

    let (out, notes) = buildkite_job(sb, "deps-1", "mkdir -p deps && echo one > deps/a.txt");
    assert!(out.contains("miss for deps-1"), "{out}");
    assert_eq!(notes.len(), 1, "{notes:?}");
    let note = &notes[0];
    assert_eq!(
        &note[..5],
        [
            "annotate",
            "--style",
            "info",
            "--context",
            "cachemount-deps-1"
        ]
    );
    assert!(
        note[5].contains("**miss**") && note[5].contains("saved as deps-1"),
        "{note:?}"
    );
    assert_eq!(keys(sb), ["deps-1"]);

    let (out, notes) = buildkite_job(sb, "deps-1", "test \"$(cat deps/a.txt)\" = one");
    assert!(
        notes[0][5].contains("**exact** (matched `deps-1`)")
            && notes[0][5].contains(&format!("{how} deps"))
            && notes[0][5].contains("not saved: the key hit exactly"),
        "{out}"
    );
    if mounted {
        assert!(notes[0][5].contains("; read "), "{notes:?}");
    }
    assert!(!is_mounted(&deps), "post-command unmounts");
    assert_eq!(keys(sb), ["deps-1"]);

    // Fallbacks take the newest key, by its whole-second creation time:
    // deps-2 must be younger than deps-1 for job 4 to match it.
    std::thread::sleep(Duration::from_millis(1100));
    let (out, notes) = buildkite_job(sb, "deps-2", "echo two >> deps/a.txt");
    assert!(
        notes[0][5].contains("**fallback** (matched `deps-1`)")
            && notes[0][5].contains("saved as deps-2"),
        "{out}"
    );
    assert!(!is_mounted(&deps));
    assert_eq!(keys(sb), ["deps-1", "deps-2"]);
    assert_eq!(saved_text(sb, "deps-2"), "one\ntwo\n");

    let (out, notes) = buildkite_job(sb, "deps-3", "echo three >> deps/a.txt; exit 7");
    assert_eq!(notes[0][2], "warning", "{notes:?}");
    assert!(
        notes[0][5].contains("**fallback** (matched `deps-2`)")
            && notes[0][5].contains("not saved: the command failed (exit 7)"),
        "{out}"
    );
    assert!(!is_mounted(&deps), "a failed command still unmounts");
    assert_eq!(
        keys(sb),
        ["deps-1", "deps-2"],
        "a failed command saves nothing"
    );
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn buildkite_plugin_over_fuse_on_the_local_store() {
    if !fuse_available("buildkite_plugin_over_fuse_on_the_local_store") {
        return;
    }
    buildkite_scenario(&Sandbox::new(), true);
}

#[test]
fn buildkite_plugin_restores_without_fuse_on_seaweedfs() {
    let Some(mut sb) = s3_sandbox("buildkite_plugin_restores_without_fuse_on_seaweedfs") else {
        return;
    };
    without_fuse(&mut sb);
    buildkite_scenario(&sb, false);
}

#[test]
fn buildkite_plugin_without_the_binary_fails_saying_how_to_install_it() {
    let sb = Sandbox::new();
    let mut cmd = base_command(&sb, "bash");
    cmd.arg(repo().join("integrations/buildkite/hooks/pre-command"))
        .env("PATH", "/usr/bin:/bin")
        .env("BUILDKITE_PLUGIN_CACHEMOUNT_KEY", "k")
        .env("BUILDKITE_PLUGIN_CACHEMOUNT_PATHS_0", "deps");
    let out = run_bounded(cmd, JOB_TIMEOUT);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not on PATH") && err.contains("cargo install"),
        "{err}"
    );
}

/// The runner: main.js, the job's command, then post.js only when the job
/// succeeded (`post-if: success()`). Returns the outputs, the state, the
/// step summary and the log.
struct GithubJob {
    outputs: BTreeMap<String, String>,
    state: BTreeMap<String, String>,
    summary: String,
    log: String,
}

fn read_pairs(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn github_job(sb: &Sandbox, key: &str, command: &str) -> GithubJob {
    let action = repo().join("integrations/github");
    let files = sb.dir.path().join(format!("gh-{key}"));
    std::fs::create_dir_all(&files).unwrap();
    let (output, state, summary) = (
        files.join("output"),
        files.join("state"),
        files.join("summary"),
    );
    let inputs = |cmd: &mut Command| {
        cmd.env("INPUT_KEY", key)
            .env("INPUT_PATH", "deps\n")
            .env("INPUT_RESTORE-KEYS", "deps-\n")
            .env("INPUT_WRITABLE", "true")
            .env("INPUT_SAVE", "on-miss")
            .env("GITHUB_OUTPUT", &output)
            .env("GITHUB_STATE", &state)
            .env("GITHUB_STEP_SUMMARY", &summary);
    };
    let mut log = String::new();
    let mut main = base_command(sb, "node");
    main.arg(action.join("main.js"));
    inputs(&mut main);
    let out = run_bounded(main, JOB_TIMEOUT);
    log += &String::from_utf8_lossy(&out.stdout);
    log += &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "main.js failed: {log}");
    let mut job = base_command(sb, "bash");
    job.arg("-c").arg(command);
    let succeeded = run_bounded(job, JOB_TIMEOUT).status.success();
    let saved_state = read_pairs(&state);
    if succeeded {
        let mut post = base_command(sb, "node");
        post.arg(action.join("post.js"));
        inputs(&mut post);
        for (k, v) in &saved_state {
            post.env(format!("STATE_{k}"), v);
        }
        let out = run_bounded(post, JOB_TIMEOUT);
        log += &String::from_utf8_lossy(&out.stdout);
        log += &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "post.js failed: {log}");
    }
    GithubJob {
        outputs: read_pairs(&output),
        state: saved_state,
        summary: std::fs::read_to_string(&summary).unwrap_or_default(),
        log,
    }
}

fn github_scenario(sb: &Sandbox, mounted: bool) {
    tools(sb);
    let deps = sb.work().join("deps");
    let outputs = |hit: &str, matched: &str, kind: &str| -> BTreeMap<String, String> {
        [
            ("cache-hit", hit),
            ("cache-matched-key", matched),
            ("hit-kind", kind),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };

    let j = github_job(sb, "deps-1", "mkdir -p deps && echo one > deps/a.txt");
    assert_eq!(j.outputs, outputs("false", "", "miss"), "{}", j.log);
    assert!(
        j.summary.contains("**miss**") && j.summary.contains("saved as deps-1"),
        "{}",
        j.summary
    );
    assert_eq!(keys(sb), ["deps-1"]);

    let j = github_job(sb, "deps-1", "test \"$(cat deps/a.txt)\" = one");
    assert_eq!(j.outputs, outputs("true", "deps-1", "exact"), "{}", j.log);
    assert!(
        j.summary.contains("not saved: the key hit exactly"),
        "{}",
        j.summary
    );
    assert!(!is_mounted(&deps));
    assert_eq!(keys(sb), ["deps-1"]);

    // deps-2 younger than deps-1 by the whole-second clock (see above).
    std::thread::sleep(Duration::from_millis(1100));
    let j = github_job(sb, "deps-2", "echo two >> deps/a.txt");
    assert_eq!(
        j.outputs,
        outputs("false", "deps-1", "fallback"),
        "{}",
        j.log
    );
    assert!(
        j.summary.contains("**fallback** (matched `deps-1`)")
            && j.summary.contains("saved as deps-2"),
        "{}",
        j.summary
    );
    assert_eq!(saved_text(sb, "deps-2"), "one\ntwo\n");

    // A failed job: no post step; the runner's clean-up stops the daemon,
    // which unmounts.
    let j = github_job(sb, "deps-3", "echo three >> deps/a.txt; exit 1");
    assert_eq!(
        j.outputs,
        outputs("false", "deps-2", "fallback"),
        "{}",
        j.log
    );
    if mounted {
        assert!(is_mounted(&deps), "mounted during the job");
        let pid: i32 = j.state["pid"].parse().unwrap();
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let gone = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            !is_mounted(&deps)
        });
        assert!(gone, "the daemon unmounts on SIGTERM");
    }
    assert_eq!(keys(sb), ["deps-1", "deps-2"], "a failed job saves nothing");
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn github_action_over_fuse_on_the_local_store() {
    if !fuse_available("github_action_over_fuse_on_the_local_store") {
        return;
    }
    github_scenario(&Sandbox::new(), true);
}

#[test]
fn github_action_restores_without_fuse_on_seaweedfs() {
    let Some(mut sb) = s3_sandbox("github_action_restores_without_fuse_on_seaweedfs") else {
        return;
    };
    without_fuse(&mut sb);
    github_scenario(&sb, false);
}

fn yaml(path: &str) -> yaml_rust2::Yaml {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    yaml_rust2::YamlLoader::load_from_str(&text)
        .unwrap()
        .remove(0)
}

/// Every `NAME` of `PREFIX_NAME` (and `PREFIX_NAME_0`) a script reads.
fn options_read(script: &str, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = script
        .split(prefix)
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect::<String>()
                .trim_end_matches('_')
                .to_string()
        })
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn plugin_yml_declares_every_option_the_hooks_read() {
    let plugin = yaml("integrations/buildkite/plugin.yml");
    assert_eq!(plugin["name"].as_str(), Some("cachemount"));
    assert!(plugin["description"].as_str().is_some());
    let config = &plugin["configuration"];
    assert_eq!(config["additionalProperties"].as_bool(), Some(false));
    let props = config["properties"].as_hash().unwrap();
    let declared: Vec<String> = props
        .keys()
        .map(|k| k.as_str().unwrap().to_uppercase())
        .collect();
    let script =
        std::fs::read_to_string(repo().join("integrations/buildkite/lib/plugin.bash")).unwrap();
    // Options read directly, and the string-or-array ones read by `cm_list NAME`.
    let mut read = options_read(&script, "BUILDKITE_PLUGIN_CACHEMOUNT_");
    read.extend(options_read(&script, "cm_list "));
    read.sort();
    assert_eq!(
        read,
        ["BINARY", "FALLBACK", "KEY", "PATHS", "SAVE", "STORE", "WRITABLE"]
    );
    for name in &read {
        assert!(declared.contains(name), "{name} is read but not declared");
    }
    assert_eq!(
        declared.len(),
        read.len(),
        "declared but unused: {declared:?}"
    );
    for (k, v) in props {
        let kind = v["type"].as_str().unwrap_or_default();
        assert!(
            ["string", "array", "boolean"].contains(&kind),
            "{k:?} has type {kind:?}"
        );
    }
    let save_values: Vec<&str> = config["properties"]["save"]["enum"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(save_values, ["always", "on-miss", "never"]);
    let required: Vec<&str> = config["required"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, ["key", "paths"]);
}

#[test]
fn action_yml_has_what_github_requires_and_the_inputs_the_scripts_read() {
    let action = yaml("integrations/github/action.yml");
    assert_eq!(action["name"].as_str(), Some("cachemount"));
    assert!(action["description"].as_str().is_some());
    let runs = &action["runs"];
    assert_eq!(runs["using"].as_str(), Some("node20"));
    for script in ["main", "post"] {
        let file = runs[script].as_str().unwrap();
        assert!(
            repo().join("integrations/github").join(file).is_file(),
            "{file}"
        );
    }
    assert_eq!(runs["post-if"].as_str(), Some("success()"));
    let inputs: Vec<&str> = action["inputs"]
        .as_hash()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(
        inputs,
        [
            "key",
            "restore-keys",
            "path",
            "store",
            "writable",
            "save",
            "binary"
        ]
    );
    let outputs: Vec<&str> = action["outputs"]
        .as_hash()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(outputs, ["cache-hit", "cache-matched-key", "hit-kind"]);
    let lib = std::fs::read_to_string(repo().join("integrations/github/lib.js")).unwrap();
    let main = std::fs::read_to_string(repo().join("integrations/github/main.js")).unwrap();
    for name in &inputs {
        assert!(
            lib.contains(&format!("input('{name}')")) || lib.contains(&format!("lines('{name}')")),
            "input {name} is declared but never read"
        );
    }
    for name in &outputs {
        assert!(
            main.contains(&format!("setOutput('{name}'")),
            "output {name} is declared but never set"
        );
    }
}
