//! Mapped-ram snapshot files through the command line: process memory
//! saved with holes and loaded (eagerly and lazily), a flipped byte
//! reported with its chunk, a background snapshot checked against the
//! digest of its pause, and a VM saved and restored lazily.

mod common;

use std::os::unix::fs::FileExt;

use common::{json_of, livemig};

#[test]
fn process_mapped_ram_round_trip_and_a_flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.mr");
    let f = file.to_str().unwrap();
    let out = livemig(&[
        "save",
        f,
        "--mem",
        "32M",
        "--fill",
        "half",
        "--dirty-rate",
        "16M",
        "--mapped-ram",
        "--threads",
        "2",
        "--json",
    ])
    .output()
    .unwrap();
    let s = json_of("save", &out);
    assert_eq!(s["status"], "completed", "{s}");
    let pages = s["save"]["pages"].as_u64().unwrap();
    let holes = s["save"]["zero-pages"].as_u64().unwrap();
    // Half random, half zero; the workload may have written into a few
    // zero pages before the pause.
    assert!(
        holes >= 3500 && pages >= 4096,
        "half zero, half random: {s}"
    );
    // Holes take no disk space.
    assert!(
        s["save"]["disk-bytes"].as_u64().unwrap() < (pages + 512) * 4096,
        "{s}"
    );
    for extra in [&["--threads", "1"][..], &["--threads", "2"], &["--lazy"]] {
        let mut args = vec!["load", f, "--mem", "32M", "--json"];
        args.extend_from_slice(extra);
        let out = livemig(&args).output().unwrap();
        let d = json_of("load", &out);
        assert!(out.status.success(), "{d}");
        assert_eq!(d["verified"], true, "{d}");
        assert_eq!(d["digest"], s["digest"], "{d}");
    }
    // Flip one byte of the first page of the second chunk (random data).
    let fh = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    let pages_offset = 8192; // one block: header page, bitmap + hashes page
    fh.write_all_at(&[0xa5], pages_offset + (2 << 20) + 99)
        .unwrap();
    for lazy in [false, true] {
        let mut args = vec!["load", f, "--mem", "32M"];
        if lazy {
            args.push("--lazy");
        }
        let out = livemig(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("block 'ram0' chunk 1") && err.contains("checksum"),
            "{err}"
        );
    }
    // The socket stream's options are refused on a mapped-ram save.
    let out = livemig(&["migrate", "tcp:127.0.0.1:9", "--mapped-ram"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("file:PATH"));
}

#[test]
fn process_background_snapshot_holds_its_pause_instant() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("b.mr");
    let uri = format!("file:{}", file.display());
    let out = livemig(&[
        "migrate",
        &uri,
        "--mem",
        "32M",
        "--dirty-rate",
        "100M",
        "--warmup",
        "0.2",
        "--background-snapshot",
        "--check-instant",
        "--json",
    ])
    .output()
    .unwrap();
    let s = json_of("background snapshot", &out);
    assert!(out.status.success(), "{s}");
    assert_eq!(s["background"]["instant-digest"], s["digest"], "{s}");
    let out = livemig(&["load", file.to_str().unwrap(), "--mem", "32M", "--json"])
        .output()
        .unwrap();
    let d = json_of("load", &out);
    assert_eq!(d["digest"], s["digest"], "{d}");
}

#[test]
fn vm_mapped_ram_save_and_lazy_restore() {
    if minivm::kvm_usable().is_err() {
        eprintln!("SKIPPED: no KVM");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("file:{}", dir.path().join("vm.mr").display());
    vm_save(&uri, &["--mapped-ram"]);
    for extra in [&["--lazy"][..], &["--threads", "2"]] {
        let d = vm_restore(&uri, extra);
        if extra[0] == "--lazy" {
            assert_eq!(d["lazy"]["done"], true, "{d}");
        }
    }
}

/// The VM shape of the snapshot tests: 64 MiB, 2 vCPUs.
const VM_SHAPE: [&str; 4] = ["--mem", "64M", "--vcpus", "2"];

/// `vm-migrate` to `uri` with `flags` after 0.3 s of warm-up: its JSON
/// report, the command checked successful.
fn vm_save(uri: &str, flags: &[&str]) -> serde_json::Value {
    let mut args = vec!["vm-migrate", uri];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--json", "--warmup", "0.3"]);
    args.extend_from_slice(&VM_SHAPE);
    let out = livemig(&args).output().unwrap();
    let s = json_of(&format!("vm-migrate {}", flags.join(" ")), &out);
    assert!(out.status.success(), "{s}");
    s
}

/// `vm-incoming` of `uri` with `extra`, the guest run 1 s: its JSON
/// report, the command checked successful and the guest's self-check
/// passed.
fn vm_restore(uri: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["vm-incoming", uri, "--seconds", "1", "--json"];
    args.extend_from_slice(&VM_SHAPE);
    args.extend_from_slice(extra);
    let out = livemig(&args).output().unwrap();
    let d = json_of(&format!("vm-incoming {}", extra.join(" ")), &out);
    assert!(out.status.success(), "{d}");
    assert_eq!(d["guest"]["self-check"], "passed", "{d}");
    d
}

/// memfd-backed guest memory (`--memfd`, the memory local mode hands
/// over) takes a background snapshot holding its pause instant, and the
/// file restores lazily.
#[test]
fn vm_memfd_background_snapshot_and_lazy_restore() {
    if minivm::kvm_usable().is_err() {
        eprintln!("SKIPPED: no KVM");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("file:{}", dir.path().join("vm.mr").display());
    let s = vm_save(
        &uri,
        &["--memfd", "--background-snapshot", "--check-instant"],
    );
    assert_eq!(s["background"]["instant-digest"], s["digest"], "{s}");
    assert_eq!(s["guest"]["self-check"], "passed", "{s}");
    let d = vm_restore(&uri, &["--lazy"]);
    assert_eq!(d["lazy"]["done"], true, "{d}");
}
