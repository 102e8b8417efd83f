//! README promises about mounts that no other test holds, on real FUSE and
//! the local store: `--foreground` keeps the daemon attached (SIGTERM ends
//! it); `umount` of a busy mount says so and `umount --lazy` detaches it;
//! writable mounts keep their layers under `$CACHEMOUNT_STATE_DIR`; a
//! writable daemon stopped by a signal keeps the changes aside (its log says
//! where); a save that would reuse less than half of the old archive writes
//! the whole archive again (compacting), one that reuses most copies it.

mod common;
use common::mount as mount_support;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cli::Sandbox;
use common::tree::{assert_same_tree, Rng};
use mount_support::{bounded, fuse_available, is_mounted, run_bounded, Mount};

/// A sandbox with `cache/` (a few small files and an 8 MiB file of noise)
/// saved under key `k`, then moved to `expected/`.
fn saved() -> Sandbox {
    let sb = Sandbox::new();
    let src = sb.work().join("cache");
    common::tree::small_files_tree(&src, 2, 30);
    fs::write(src.join("big.bin"), Rng::new(3).noise(8 << 20)).unwrap();
    sb.ok(&["save", "-q", "--key", "k", "cache"]);
    fs::rename(&src, sb.dir.path().join("expected")).unwrap();
    sb
}

/// Waits until `cond` holds; panics after `timeout`.
fn wait_until(timeout: Duration, what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Mount points below `dir` (/proc/self/mountinfo).
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect()
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn foreground_keeps_the_daemon_attached_until_sigterm() {
    let test = "foreground_keeps_the_daemon_attached_until_sigterm";
    if !fuse_available(test) {
        return;
    }
    let sb = saved();
    let target = sb.work().join("cache");
    let mut child = sb
        .command(&["mount", "--foreground", "--key", "k", "cache"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Unmount whatever happens below.
    struct Guard(PathBuf, u32);
    impl Drop for Guard {
        fn drop(&mut self) {
            if is_mounted(&self.0) {
                let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            unsafe { libc::kill(self.1 as i32, libc::SIGKILL) };
        }
    }
    let _guard = Guard(target.clone(), child.id());
    let t = target.clone();
    wait_until(Duration::from_secs(60), "the foreground mount", move || {
        is_mounted(&t)
    });
    let t = target.clone();
    let expected = sb.dir.path().join("expected");
    bounded(Duration::from_secs(60), "reading the mount", move || {
        assert_same_tree(&expected, &t)
    });
    // The command is the daemon: still running, attached.
    assert!(child.try_wait().unwrap().is_none(), "--foreground returned");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not end the daemon");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "the daemon exited with {status:?}");
    assert!(!is_mounted(&target), "SIGTERM left the mount behind");
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_busy_mount_is_refused_by_umount_and_detached_by_umount_lazy() {
    let test = "a_busy_mount_is_refused_by_umount_and_detached_by_umount_lazy";
    if !fuse_available(test) {
        return;
    }
    let sb = saved();
    let m = Mount::new(&sb, &["--key", "k", "cache"]);
    let path = m.path().display().to_string();
    let open = fs::File::open(m.path().join("big.bin")).unwrap();
    let line = sb.fails_with(
        &["umount", &path],
        1,
        &format!("error: {path} is busy: a process has a file open there"),
    );
    assert!(line.contains("--lazy"), "{line}");
    assert!(is_mounted(m.path()), "a refused umount unmounted");
    assert!(m.daemon_alive());
    sb.ok(&["umount", "--lazy", &path]);
    assert!(!is_mounted(m.path()), "--lazy left it mounted");
    // The open file keeps working until it is closed; then the daemon ends.
    let mut first = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&open, &mut first, 0).unwrap();
    let want = fs::read(sb.dir.path().join("expected/big.bin")).unwrap();
    assert_eq!(first[..], want[..4096]);
    drop(open);
    assert!(
        m.wait_daemon_gone(Duration::from_secs(30)),
        "the daemon outlived its detached mount"
    );
}

/// A writable mount of key `k` whose layers live under `state`.
fn writable(sb: &mut Sandbox, state: &Path) -> Mount {
    sb.env
        .push(("CACHEMOUNT_STATE_DIR".into(), state.display().to_string()));
    Mount::new(sb, &["--writable", "--key", "k", "cache"])
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn writable_layers_live_under_cachemount_state_dir() {
    let test = "writable_layers_live_under_cachemount_state_dir";
    if !fuse_available(test) {
        return;
    }
    let mut sb = saved();
    let state = sb.dir.path().join("state");
    let m = writable(&mut sb, &state);
    let lower = mounts_below(&state);
    assert_eq!(lower.len(), 1, "one lower mount under {state:?}: {lower:?}");
    assert!(
        fs::read_dir(&state).unwrap().count() >= 1,
        "no layers under the state dir"
    );
    fs::write(m.path().join("new-file"), b"upper").unwrap();
    let path = m.path().display().to_string();
    sb.ok(&["umount", &path]);
    assert!(
        mounts_below(&state).is_empty(),
        "umount left {:?} mounted",
        mounts_below(&state)
    );
    assert!(m.wait_daemon_gone(Duration::from_secs(30)));
    // The upper dir (and the new file) went with it.
    let leftover: Vec<_> = walk_files(&state);
    assert!(
        !leftover.iter().any(|p| p.ends_with("new-file")),
        "umount kept the changes: {leftover:?}"
    );
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_writable_daemon_stopped_by_a_signal_keeps_the_changes_aside() {
    let test = "a_writable_daemon_stopped_by_a_signal_keeps_the_changes_aside";
    if !fuse_available(test) {
        return;
    }
    let mut sb = saved();
    let state = sb.dir.path().join("state");
    let m = writable(&mut sb, &state);
    fs::create_dir(m.path().join("built")).unwrap();
    fs::write(m.path().join("built/output.o"), b"object code").unwrap();
    unsafe { libc::kill(m.pid as i32, libc::SIGTERM) };
    assert!(
        m.wait_daemon_gone(Duration::from_secs(30)),
        "SIGTERM did not end the daemon"
    );
    assert!(!is_mounted(m.path()), "the overlay is still mounted");
    assert!(
        mounts_below(&state).is_empty(),
        "the lower is still mounted"
    );
    let log = m.log_text();
    let marker = format!("the changes made at {} are kept in ", m.path().display());
    let kept = log
        .lines()
        .find_map(|l| l.split_once(&marker).map(|(_, k)| PathBuf::from(k.trim())))
        .unwrap_or_else(|| panic!("the log does not say where the changes are: {log}"));
    assert!(kept.starts_with(&state), "{kept:?} is not under {state:?}");
    assert_eq!(
        fs::read(kept.join("built/output.o")).unwrap(),
        b"object code"
    );
}

/// The `transferred:` line of a save: (uploaded, copied, downloaded).
fn transferred(stdout: &str) -> (u64, u64, u64) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("transferred: "))
        .unwrap_or_else(|| panic!("no transferred line: {stdout}"));
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    (n[0], n[1], n[2])
}

/// A sandbox with `cache/` holding two files of noise — `a.bin` 45% and
/// `b.bin` 55% of the archive — and a few small files, saved as key `k`.
fn saved_in_two_parts() -> Sandbox {
    let sb = Sandbox::new();
    let src = sb.work().join("cache");
    common::tree::small_files_tree(&src, 2, 10);
    fs::write(src.join("a.bin"), Rng::new(3).noise(4_500 << 10)).unwrap();
    fs::write(src.join("b.bin"), Rng::new(4).noise(5_500 << 10)).unwrap();
    sb.ok(&["save", "-q", "--key", "k", "cache"]);
    fs::remove_dir_all(&src).unwrap();
    sb
}

/// In a writable mount of `k`: replaces `file` with new noise and saves the
/// result as `key`; returns (uploaded, copied), the merged view (copied
/// aside) and the new archive's size.
fn replace_and_save(sb: &mut Sandbox, file: &str, key: &str) -> ((u64, u64), PathBuf, u64) {
    let state = sb.dir.path().join("state");
    let m = writable(sb, &state);
    let path = m.path().to_path_buf();
    let len = fs::metadata(path.join(file)).unwrap().len() as usize;
    fs::write(path.join(file), Rng::new(99).noise(len)).unwrap();
    let out = sb.ok(&["save", "--key", key, "cache"]);
    let (uploaded, copied, _) = transferred(&out);
    let view = sb.dir.path().join(format!("view-{key}"));
    let mut cp = std::process::Command::new("cp");
    cp.arg("-a").arg(&path).arg(&view);
    assert!(run_bounded(cp, Duration::from_secs(120)).status.success());
    let p = path.display().to_string();
    sb.ok(&["umount", &p]);
    assert!(m.wait_daemon_gone(Duration::from_secs(30)));
    sb.env.retain(|(k, _)| k != "CACHEMOUNT_STATE_DIR");
    let pointer: serde_json::Value =
        serde_json::from_slice(&fs::read(Path::new(&sb.store).join("keys").join(key)).unwrap())
            .unwrap();
    ((uploaded, copied), view, pointer["size"].as_u64().unwrap())
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn a_save_reusing_less_than_half_of_the_archive_compacts_and_one_reusing_more_copies() {
    let test = "a_save_reusing_less_than_half_of_the_archive_compacts_and_one_reusing_more_copies";
    if !fuse_available(test) {
        return;
    }
    let mut sb = saved_in_two_parts();
    // a.bin replaced: 55% of the old bytes still used — incremental: the old
    // archive is copied inside the store, the new a.bin follows it.
    let ((_, copied), view, size) = replace_and_save(&mut sb, "a.bin", "reuses-55");
    assert!(
        copied >= 5_500 << 10,
        "an incremental save copies the old bytes: copied {copied}"
    );
    assert!(
        size > 14 << 20,
        "the old a.bin stays as unreferenced bytes: {size}"
    );
    sb.ok(&["restore", "-q", "--key", "reuses-55"]);
    assert_same_tree(&view, &sb.work().join("cache"));
    fs::remove_dir_all(sb.work().join("cache")).unwrap();
    // b.bin replaced instead: 45% still used — the whole archive is written
    // again: nothing copied, no unreferenced bytes.
    let ((uploaded, copied), view, size) = replace_and_save(&mut sb, "b.bin", "reuses-45");
    assert_eq!(copied, 0, "a compacting save copies nothing");
    assert!(
        uploaded >= 10_000 << 10,
        "the whole archive is uploaded: {uploaded}"
    );
    assert!(size < 11 << 20, "the compacted archive is {size} bytes");
    sb.ok(&["restore", "-q", "--key", "reuses-45"]);
    assert_same_tree(&view, &sb.work().join("cache"));
}
