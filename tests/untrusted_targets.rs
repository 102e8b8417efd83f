//! A cache is untrusted input (DESIGN §7, README "Security model"): whatever
//! an archive holds, `restore` and `mount` write, replace or hide nothing
//! beside the paths that were saved, never write through a symlink, and grant
//! nothing (no setuid/setgid bits, only `user.*` xattrs, the archived owner
//! only with `--same-owner`). Each test crafts the archive a pull-request
//! build or another tool could have written, runs the real binary, and looks
//! at what a user would see: the error, the siblings, the bits on disk.

mod common;
use common::mount as mount_support;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::cli::Sandbox;
use mount_support::{fuse_available, is_mounted, Mount};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

/// One member of a crafted zip.
enum Member<'a> {
    File(&'a str, &'a [u8]),
    Mode(&'a str, &'a [u8], u32),
    Symlink(&'a str, &'a str),
}

/// A Buildkite-layout zip with `mappings` (JSON object body) and `members`.
fn crafted_zip(path: &Path, mappings: &str, members: &[Member<'_>]) -> String {
    let mut zip = ZipWriter::new(fs::File::create(path).unwrap());
    zip.start_file(
        ".buildkite/cache-manifest.json",
        SimpleFileOptions::default(),
    )
    .unwrap();
    write!(zip, r#"{{"version":2,"mappings":{{{mappings}}}}}"#).unwrap();
    let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    for m in members {
        match m {
            Member::File(name, data) => {
                zip.start_file(*name, opts.unix_permissions(0o644)).unwrap();
                zip.write_all(data).unwrap();
            }
            Member::Mode(name, data, mode) => {
                zip.start_file(*name, opts.unix_permissions(*mode)).unwrap();
                zip.write_all(data).unwrap();
            }
            Member::Symlink(name, target) => zip.add_symlink(*name, *target, opts).unwrap(),
        }
    }
    zip.finish().unwrap();
    format!("file://{}", path.display())
}

fn write(path: &Path, data: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The issue's example: a Buildkite cache of `vendor/bundle` restored by URL
/// with no PATH replaces `vendor/bundle`, not `vendor/`.
#[test]
fn foreign_cache_of_a_nested_path_restores_only_that_path() {
    let sb = Sandbox::new();
    write(&sb.work().join("vendor/other/keep.txt"), "keep");
    write(&sb.work().join("vendor/bundle/gems/stale.rb"), "stale");
    let url = crafted_zip(
        &sb.dir.path().join("bk-vendor-bundle.zip"),
        r#""_0":".""#,
        &[
            Member::File(
                "_0/vendor/bundle/gems/rack/lib/rack.rb",
                b"module Rack; end",
            ),
            Member::File("_0/vendor/bundle/specifications/rack.gemspec", b"spec"),
        ],
    );
    let out = sb.ok(&["restore", &url]);
    assert!(out.contains("vendor/bundle"), "{out}");
    assert_eq!(
        fs::read_to_string(sb.work().join("vendor/other/keep.txt")).unwrap(),
        "keep"
    );
    assert_eq!(listing(&sb.work().join("vendor")), ["bundle", "other"]);
    assert_eq!(
        listing(&sb.work().join("vendor/bundle")),
        ["gems", "specifications"],
        "the target is replaced whole: the stale file is gone"
    );
    assert!(!sb.work().join("vendor/bundle/gems/stale.rb").exists());
    assert_eq!(
        fs::read(sb.work().join("vendor/bundle/gems/rack/lib/rack.rb")).unwrap(),
        b"module Rack; end"
    );
}

/// Under `~`: a cache of `~/.cache/pip` leaves the rest of `~/.cache` (and
/// cachemount's own store in it) alone.
#[test]
fn foreign_cache_under_home_keeps_the_rest_of_home() {
    let mut sb = Sandbox::new();
    sb.store = sb
        .home()
        .join(".cache/cachemount/store")
        .display()
        .to_string();
    write(&sb.home().join(".cache/other/keep"), "keep");
    sb.ok(&["save", "--key", "mine", "../home/.cache/other"]);
    let url = crafted_zip(
        &sb.dir.path().join("bk-pip.zip"),
        r#""_0":"~""#,
        &[
            Member::File("_0/.cache/pip/http/a", b"a"),
            Member::File("_0/.cache/pip/wheels/b.whl", b"b"),
        ],
    );
    sb.ok(&["restore", &url]);
    assert_eq!(
        listing(&sb.home().join(".cache")),
        ["cachemount", "other", "pip"]
    );
    assert_eq!(
        fs::read_to_string(sb.home().join(".cache/other/keep")).unwrap(),
        "keep"
    );
    // The store under ~/.cache still serves its cache.
    fs::remove_dir_all(sb.home().join(".cache/other")).unwrap();
    sb.ok(&["restore", "--key", "mine"]);
    assert_eq!(
        fs::read_to_string(sb.home().join(".cache/other/keep")).unwrap(),
        "keep"
    );
}

/// Under `/`: a cache of `/…/opt/tool` leaves `/…/opt/other` alone.
#[test]
fn foreign_cache_under_root_keeps_siblings() {
    let sb = Sandbox::new();
    let opt = sb.dir.path().join("opt");
    write(&opt.join("other/keep"), "keep");
    let rel = opt.strip_prefix("/").unwrap().display().to_string();
    let tool = format!("_0/{rel}/tool/bin/tool");
    let url = crafted_zip(
        &sb.dir.path().join("bk-opt.zip"),
        r#""_0":"/""#,
        &[Member::Mode(&tool, b"#!/bin/sh\n", 0o755)],
    );
    sb.ok(&["restore", &url]);
    assert_eq!(listing(&opt), ["other", "tool"]);
    assert_eq!(fs::read_to_string(opt.join("other/keep")).unwrap(), "keep");
    assert_eq!(fs::read(opt.join("tool/bin/tool")).unwrap(), b"#!/bin/sh\n");
}

/// A single-file target is that file: its directory's other files stay.
#[test]
fn foreign_single_file_target_is_that_file() {
    let sb = Sandbox::new();
    write(&sb.work().join("conf/other.toml"), "keep");
    let url = crafted_zip(
        &sb.dir.path().join("one.zip"),
        r#""_0":".""#,
        &[Member::File("_0/conf/tool.toml", b"x = 1")],
    );
    sb.ok(&["restore", &url]);
    assert_eq!(
        listing(&sb.work().join("conf")),
        ["other.toml", "tool.toml"]
    );
}

/// A cache whose target is the home directory or `/` itself is refused:
/// restoring it would replace them whole.
#[test]
fn whole_home_or_root_is_refused() {
    let sb = Sandbox::new();
    write(&sb.home().join("keep"), "keep");
    sb.ok(&["save", "--key", "home", "~"]);
    let (code, err) = sb.fails(&["restore", "--key", "home"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("refusing to restore into") && err.contains("home directory"),
        "{err}"
    );
    let (_, err) = sb.fails(&["restore", "--key", "home", "~"]);
    assert!(err.contains("home directory"), "{err}");
    assert_eq!(listing(&sb.home()), ["keep"]);

    let url = crafted_zip(
        &sb.dir.path().join("root.zip"),
        r#""_0":"/""#,
        &[Member::File("_0", b"everything")],
    );
    let (code, err) = sb.fails(&["restore", &url]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("root file system"), "{err}");
}

/// Two namespaces mapped to one anchor: one plants a symlink to a directory
/// outside, the other writes through it. Nothing is written outside, on the
/// first restore or on a second restore over the first's result.
#[test]
fn no_write_through_a_planted_symlink_across_targets() {
    let sb = Sandbox::new();
    let outside = sb.dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let target = outside.display().to_string();
    let url = crafted_zip(
        &sb.dir.path().join("two-ns.zip"),
        r#""_0":".","_1":".""#,
        &[
            Member::Symlink("_0/a", &target),
            Member::File("_1/a/evil", b"pwned"),
        ],
    );
    let (code, err) = sb.fails(&["restore", &url]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("overlap"), "{err}");
    assert!(listing(&outside).is_empty());
    assert!(
        fs::symlink_metadata(sb.work().join("a")).is_err(),
        "nothing was swapped in"
    );

    // First a cache that only plants the link (a symlink may point anywhere)…
    let plant = crafted_zip(
        &sb.dir.path().join("plant.zip"),
        r#""_0":".""#,
        &[Member::Symlink("_0/a", &target)],
    );
    sb.ok(&["restore", &plant]);
    assert!(fs::symlink_metadata(sb.work().join("a"))
        .unwrap()
        .file_type()
        .is_symlink());
    // …then one that writes below it, and one below it through a deeper path.
    for (file, member) in [("below.zip", "_0/a/evil"), ("deeper.zip", "_0/a/x/y/evil")] {
        let through = crafted_zip(
            &sb.dir.path().join(file),
            r#""_0":".""#,
            &[Member::File(member, b"pwned")],
        );
        let (code, err) = sb.fails(&["restore", &through]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("is a symlink"), "{err}");
        assert!(listing(&outside).is_empty(), "{file} wrote outside");
    }
}

/// A cachemount-written archive (with an index) and two namespaces on one
/// anchor that overlap is refused the same way.
#[test]
fn overlapping_namespaces_of_a_cachemount_archive_are_refused() {
    use cachemount::archive::{ArchiveWriter, Manifest, WriterOptions};
    let sb = Sandbox::new();
    let path = sb.dir.path().join("crafted.zip");
    let mut manifest = Manifest::default();
    manifest.mappings.insert("_0".into(), ".".into());
    manifest.mappings.insert("_1".into(), ".".into());
    let mut w = ArchiveWriter::new(
        fs::File::create(&path).unwrap(),
        manifest,
        WriterOptions::default(),
    )
    .unwrap();
    w.add_symlink(meta("_0/a", 0o777, Vec::new()), b"/tmp")
        .unwrap();
    w.add_dir(meta("_1/a", 0o755, Vec::new())).unwrap();
    w.finish().unwrap();
    let (code, err) = sb.fails(&["restore", &format!("file://{}", path.display())]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("overlap"), "{err}");
}

fn meta(
    name: &str,
    mode: u32,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
) -> cachemount::archive::writer::EntryMeta {
    cachemount::archive::writer::EntryMeta {
        name: name.as_bytes().to_vec(),
        mode,
        uid: 4321,
        gid: 4321,
        mtime: cachemount::archive::Timestamp {
            secs: 1_700_000_000,
            nanos: 5,
        },
        xattrs,
    }
}

/// Restore applies no setuid/setgid bits, only `user.*` xattrs, and the
/// archive's owner only with `--same-owner`.
#[test]
fn restore_grants_no_privilege() {
    use cachemount::archive::{ArchiveWriter, Manifest, WriterOptions};
    let sb = Sandbox::new();
    let path = sb.dir.path().join("privileged.zip");
    let mut manifest = Manifest::default();
    manifest.mappings.insert("_0".into(), ".".into());
    let mut w = ArchiveWriter::new(
        fs::File::create(&path).unwrap(),
        manifest,
        WriterOptions::default(),
    )
    .unwrap();
    // Non-`user.*` xattrs (`trusted.*`, `security.*`) make the archive
    // unreadable at open (archive::limits), so only `user.*` can get here.
    let xattrs = vec![(b"user.ok".to_vec(), b"yes".to_vec())];
    w.add_dir(meta("_0/tool", 0o2775, Vec::new())).unwrap();
    let content = b"#!/bin/sh\nid -u\n";
    let frame = cachemount::archive::writer::compress_frame(content, 3, true).unwrap();
    w.add_file(
        meta("_0/tool/su", 0o6755, xattrs),
        content.len() as u64,
        [Ok(frame)],
    )
    .unwrap();
    w.finish().unwrap();
    let url = format!("file://{}", path.display());

    sb.ok(&["restore", &url]);
    let su = sb.work().join("tool/su");
    let md = fs::metadata(&su).unwrap();
    assert_eq!(
        md.permissions().mode() & 0o7777,
        0o755,
        "setuid/setgid dropped"
    );
    assert_eq!(
        fs::metadata(sb.work().join("tool"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o775
    );
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    assert_eq!(
        (md.uid(), md.gid()),
        (me, unsafe { libc::getegid() }),
        "not the archive's owner by default"
    );
    assert_eq!(
        xattr::get(&su, "user.ok").unwrap().as_deref(),
        Some(&b"yes"[..])
    );
    if me == 0 {
        assert_eq!(
            xattr::get(&su, "trusted.evil").unwrap(),
            None,
            "only user.* xattrs"
        );
        sb.ok(&["restore", "--same-owner", &url]);
        let md = fs::metadata(&su).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (4321, 4321),
            "--same-owner applies the owner"
        );
        assert_eq!(md.permissions().mode() & 0o7777, 0o755, "still no setuid");
    } else {
        common::skip::missing(
            "restore_grants_no_privilege",
            common::skip::Need::Root,
            "the --same-owner part: not root",
        );
    }
}

/// A swap that fails (the second target is busy: a mount point) leaves no
/// staged tree behind.
#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn failed_swap_removes_staged_trees() {
    if !fuse_available("failed_swap_removes_staged_trees") {
        return;
    }
    let sb = Sandbox::new();
    fs::create_dir_all(sb.work().join("b")).unwrap();
    let b = sb.work().join("b");
    let c = std::ffi::CString::new(b.display().to_string()).unwrap();
    // SAFETY: valid C strings; the mount is detached below.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            c.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    struct Detach(std::ffi::CString);
    impl Drop for Detach {
        fn drop(&mut self) {
            unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _detach = Detach(c);
    let url = crafted_zip(
        &sb.dir.path().join("ab.zip"),
        r#""_0":".""#,
        &[
            Member::File("_0/a/x", b"a"),
            Member::File("_0/a/y", b"a"),
            Member::File("_0/b/x", b"b"),
            Member::File("_0/b/y", b"b"),
        ],
    );
    let (code, err) = sb.fails(&["restore", &url]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("into place"), "{err}");
    let left: Vec<String> = listing(&sb.work())
        .into_iter()
        .filter(|n| n.contains(".cachemount-"))
        .collect();
    assert!(left.is_empty(), "staged trees left behind: {left:?}");
}

/// Staging dirs of a killed restore are swept on the next restore of that
/// target; a live process's and other targets' are left alone.
#[test]
fn leftovers_of_a_killed_restore_are_swept() {
    let sb = Sandbox::new();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let me = std::process::id();
    let dead_staging = sb
        .work()
        .join(format!(".deps.cachemount-restoring-{dead}-0badf00d"));
    let dead_old = sb
        .work()
        .join(format!(".deps.cachemount-old-{dead}-0badf00e"));
    let live = sb
        .work()
        .join(format!(".deps.cachemount-restoring-{me}-0badf00d"));
    let other = sb
        .work()
        .join(format!(".other.cachemount-restoring-{dead}-0badf00d"));
    for d in [&dead_staging, &dead_old, &live, &other] {
        write(&d.join("sub/f"), "x");
    }
    // A read-only leftover dir, and one holding a link out, are removed by fd.
    fs::set_permissions(dead_staging.join("sub"), fs::Permissions::from_mode(0o500)).unwrap();
    let outside = sb.dir.path().join("outside");
    write(&outside.join("keep"), "keep");
    std::os::unix::fs::symlink(&outside, dead_old.join("out")).unwrap();
    let url = crafted_zip(
        &sb.dir.path().join("deps.zip"),
        r#""_0":".""#,
        &[
            Member::File("_0/deps/a", b"a"),
            Member::File("_0/deps/b", b"b"),
        ],
    );
    sb.ok(&["restore", &url]);
    assert!(
        !dead_staging.exists() && !dead_old.exists(),
        "dead restore's trees swept"
    );
    assert!(live.exists(), "a live process's staging dir is not touched");
    assert!(
        other.exists(),
        "only the restored target's leftovers are swept"
    );
    assert_eq!(fs::read_to_string(outside.join("keep")).unwrap(), "keep");
}

/// The old tree a restore replaces is removed by directory fd: a symlink in
/// it is removed, not followed, and read-only directories go too.
#[test]
fn replacing_an_old_tree_never_follows_its_links() {
    let sb = Sandbox::new();
    let outside = sb.dir.path().join("outside");
    write(&outside.join("keep"), "keep");
    write(&sb.work().join("deps/ro/f"), "old");
    std::os::unix::fs::symlink(&outside, sb.work().join("deps/out")).unwrap();
    fs::set_permissions(sb.work().join("deps/ro"), fs::Permissions::from_mode(0o500)).unwrap();
    let url = crafted_zip(
        &sb.dir.path().join("deps.zip"),
        r#""_0":".""#,
        &[
            Member::File("_0/deps/new", b"new"),
            Member::File("_0/deps/sub/x", b"x"),
        ],
    );
    sb.ok(&["restore", &url]);
    assert_eq!(listing(&sb.work().join("deps")), ["new", "sub"]);
    assert_eq!(fs::read_to_string(outside.join("keep")).unwrap(), "keep");
}

/// A mount of a foreign cache of `vendor/bundle` mounts there and hides
/// nothing beside it.
#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn foreign_mount_hides_nothing_beside_its_target() {
    if !fuse_available("foreign_mount_hides_nothing_beside_its_target") {
        return;
    }
    let sb = Sandbox::new();
    write(&sb.work().join("vendor/other/keep.txt"), "keep");
    let url = crafted_zip(
        &sb.dir.path().join("bk.zip"),
        r#""_0":".""#,
        &[
            Member::File("_0/vendor/bundle/gems/a.rb", b"a"),
            Member::File("_0/vendor/bundle/specifications/a.gemspec", b"spec"),
        ],
    );
    let m = Mount::new(&sb, &[&url]);
    assert_eq!(m.path(), sb.work().join("vendor/bundle"));
    assert!(is_mounted(&sb.work().join("vendor/bundle")));
    assert!(!is_mounted(&sb.work().join("vendor")));
    assert_eq!(
        fs::read_to_string(sb.work().join("vendor/other/keep.txt")).unwrap(),
        "keep"
    );
    assert_eq!(
        fs::read(sb.work().join("vendor/bundle/gems/a.rb")).unwrap(),
        b"a"
    );
}

/// A mount whose target lies below a symlink is refused before anything is mounted.
#[test]
#[ignore = "fuse: needs root and /dev/fuse (its own tier in scripts/test)"]
fn mount_through_a_symlink_is_refused() {
    if !fuse_available("mount_through_a_symlink_is_refused") {
        return;
    }
    let sb = Sandbox::new();
    let outside = sb.dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, sb.work().join("vendor")).unwrap();
    let url = crafted_zip(
        &sb.dir.path().join("bk.zip"),
        r#""_0":".""#,
        &[Member::File("_0/vendor/bundle/gems/a.rb", b"a")],
    );
    let (code, err) = mount_support::mount_fails(&sb, &[&url]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is a symlink"), "{err}");
    assert!(listing(&outside).is_empty());
    assert!(!is_mounted(&outside.join("bundle")));
}
