//! Mounts grant nothing and touch nothing that is not theirs (issue 10,
//! items 3 and 7), on real FUSE and real overlays: every layer of a
//! read-only, kernel-overlay and fuse-overlayfs mount is `nosuid,nodev` and a
//! setuid-root program in the cache runs without euid 0; `umount` refuses a
//! mount cachemount did not make; the daemon's log and a writable mount's
//! state are private and never written through a symlink.

mod common;
use common::mount as mount_support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cachemount::mount::control::is_cachemount;
use cachemount::mount::preflight::{mount_at, MountEntry};
use common::cli::Sandbox;
use mount_support::{fuse_available, is_mounted, mount_fails, run_bounded, Mount};

/// A sandbox whose `cache/` (a setuid-root copy of `id`, and a file) is
/// saved under `k`, with the writable layers in `state/`. Every directory on
/// the way is searchable, so that another user can run the program.
fn saved_setuid() -> Sandbox {
    let mut sb = Sandbox::new();
    let cache = sb.work().join("cache");
    fs::create_dir_all(&cache).unwrap();
    fs::copy("/usr/bin/id", cache.join("id")).unwrap();
    fs::set_permissions(cache.join("id"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::write(cache.join("file"), b"content").unwrap();
    for d in [sb.dir.path(), &sb.work()] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    sb.ok(&["save", "--key", "k", "cache"]);
    fs::remove_dir_all(&cache).unwrap();
    let state = sb.dir.path().join("state");
    sb.env
        .push(("CACHEMOUNT_STATE_DIR".into(), state.display().to_string()));
    sb
}

fn assert_nosuid_nodev(entry: &MountEntry) {
    assert!(
        entry.has_option("nosuid") && entry.has_option("nodev"),
        "{} ({}) is mounted {}",
        entry.mount_point.display(),
        entry.fstype,
        entry.options
    );
}

/// The effective uid `program` runs with as user `nobody`.
fn euid_as_nobody(program: &Path) -> String {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(program)
        .arg("-u");
    let out = run_bounded(cmd, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The read-only FUSE layers a writable mount made under `state`.
fn lower_layers(state: &Path) -> Vec<MountEntry> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut out = Vec::new();
    for line in info.lines() {
        let mp = PathBuf::from(line.split(' ').nth(4).unwrap());
        if mp.starts_with(state) {
            out.extend(mount_at(&mp));
        }
    }
    out
}

/// Mounts `k` (with `args`) and checks both layers and the setuid program;
/// `overlay` is the writable overlay's filesystem type.
fn check_mount(sb: &Sandbox, args: &[&str], overlay: Option<&str>) {
    let mut full = vec!["--key", "k", "cache"];
    full.extend_from_slice(args);
    let m = Mount::new(sb, &full);
    let top = mount_at(m.path()).expect("mounted");
    assert_nosuid_nodev(&top);
    let read_only = match overlay {
        Some(fstype) => {
            assert_eq!(top.fstype, fstype);
            let lower = lower_layers(&sb.dir.path().join("state"));
            assert_eq!(lower.len(), 1, "{lower:?}");
            lower.into_iter().next().unwrap()
        }
        None => top,
    };
    assert!(is_cachemount(&read_only), "{read_only:?}");
    assert_nosuid_nodev(&read_only);
    let id = m.path().join("id");
    assert_eq!(fs::metadata(&id).unwrap().mode() & 0o4000, 0o4000);
    assert_eq!(euid_as_nobody(Path::new("/usr/bin/id")), "65534");
    assert_eq!(euid_as_nobody(&id), "65534", "setuid root took effect");
    let p = m.path().display().to_string();
    sb.ok(&["umount", &p]);
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn every_mount_layer_is_nosuid_and_nodev() {
    if !fuse_available("every_mount_layer_is_nosuid_and_nodev") {
        return;
    }
    let mut sb = saved_setuid();
    check_mount(&sb, &[], None);
    sb.env.push(("CACHEMOUNT_OVERLAY".into(), "kernel".into()));
    check_mount(&sb, &["--writable"], Some("overlay"));
    sb.env.pop();
    sb.env
        .push(("CACHEMOUNT_OVERLAY".into(), "fuse-overlayfs".into()));
    check_mount(&sb, &["--writable"], Some("fuse.fuse-overlayfs"));
}

/// A tmpfs at `path`, unmounted (lazily) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(path: &Path) -> Tmpfs {
        fs::create_dir_all(path).unwrap();
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let rc = unsafe {
            libc::mount(
                c"test-tmpfs".as_ptr(),
                c.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn umount_refuses_mounts_cachemount_did_not_make() {
    if !fuse_available("umount_refuses_mounts_cachemount_did_not_make") {
        return;
    }
    let sb = saved_setuid();
    let other = sb.work().join("other");
    let tmpfs = Tmpfs::new(&other);
    fs::write(other.join("precious"), b"keep me").unwrap();
    let (code, stderr) = sb.fails(&["umount", "other"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("is a tmpfs mount of test-tmpfs, not one cachemount made"),
        "{stderr}"
    );
    assert!(is_mounted(&other) && other.join("precious").exists());
    drop(tmpfs);

    // A writable mount covered by someone else's mount: neither is touched.
    let m = Mount::new(&sb, &["--key", "k", "cache", "--writable"]);
    let covered = Tmpfs::new(m.path());
    let (_, stderr) = sb.fails(&["umount", "cache"]);
    assert!(stderr.contains("not one cachemount made"), "{stderr}");
    assert_eq!(mount_at(m.path()).unwrap().fstype, "tmpfs");
    drop(covered);
    assert_eq!(mount_at(m.path()).unwrap().fstype, "overlay");
    sb.ok(&["umount", "cache"]);
    assert!(!is_mounted(m.path()));
    assert!(lower_layers(&sb.dir.path().join("state")).is_empty());
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn the_daemon_log_and_writable_state_are_private() {
    if !fuse_available("the_daemon_log_and_writable_state_are_private") {
        return;
    }
    let sb = saved_setuid();
    // An older cachemount made the log directory world-readable.
    let logs = sb.home().join(".cache/cachemount/logs");
    fs::create_dir_all(&logs).unwrap();
    fs::set_permissions(&logs, fs::Permissions::from_mode(0o755)).unwrap();
    let m = Mount::new(&sb, &["--key", "k", "cache", "--writable"]);
    assert!(m.log.starts_with(&logs), "{}", m.log.display());
    assert_eq!(mode(&m.log), 0o600);
    assert_eq!(mode(&logs), 0o700);
    let state = sb.dir.path().join("state");
    assert_eq!(mode(&state), 0o700);
    let dirs: Vec<PathBuf> = fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    assert_eq!(mode(&dirs[0]), 0o700);
    assert_eq!(mode(&dirs[0].join("state.json")), 0o600);
    assert!(m.log_text().contains("serving k"), "{}", m.log_text());
    sb.ok(&["umount", "cache"]);

    // A log file that is a symlink planted by someone else is not written through.
    let victim = sb.dir.path().join("victim");
    fs::write(&victim, b"untouched").unwrap();
    let link = sb.dir.path().join("log-link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let link_arg = link.display().to_string();
    let (_, stderr) = mount_fails(&sb, &["--key", "k", "cache", "--log-file", &link_arg]);
    assert!(
        stderr.contains("cannot open the log file") && stderr.contains("symbolic links"),
        "{stderr}"
    );
    assert_eq!(fs::read(&victim).unwrap(), b"untouched");
    assert!(!is_mounted(&sb.work().join("cache")));
}
