//! `--local` end to end between two `livemig` processes: memory handed
//! over through a Unix socket (memfds, SCM_RIGHTS), not copied.

mod common;

use common::{json_line, json_of, kvm_available, livemig, spawn_listening, wait_for_path};

#[test]
fn process_memory_is_handed_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("local.sock");
    let uri = format!("unix:{}", path.display());
    let (dest, dest_err) = spawn_listening(
        &mut livemig(&[
            "incoming", &uri, "--local", "--mem", "64M", "--blocks", "2", "--json",
        ]),
        "waiting for a local migration on unix:",
    );
    let src = livemig(&[
        "migrate",
        &uri,
        "--local",
        "--mem",
        "64M",
        "--blocks",
        "2",
        "--fill",
        "random",
        "--dirty-rate",
        "32M",
        "--warmup",
        "0.2",
        "--json",
    ])
    .output()
    .unwrap();
    let dst = dest.wait_with_output().unwrap();
    let dst_err = dest_err.join().unwrap();
    assert!(
        src.status.success(),
        "source: {}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert!(dst.status.success(), "destination: {dst_err}");
    let s = json_of("source", &src);
    let d = json_line("destination", &dst.stdout, dst_err.as_bytes());
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["mode"], "local");
    assert!(s["digest"].is_string());
    assert_eq!(s["digest"], d["digest"], "the same memory on both sides");
    assert_eq!(d["memory"], 64 << 20);
    assert_eq!(d["files"], 2, "one memfd per block");
    let out = s["socket-bytes"]["out"].as_u64().unwrap();
    assert!(out < 4096, "{out} bytes for 64 MiB of memory");
    assert!(!path.exists(), "the destination removed its socket");
}

#[test]
fn vm_moves_to_a_new_process_without_copying() {
    if !kvm_available("vm_moves_to_a_new_process_without_copying") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.sock");
    let uri = format!("unix:{}", path.display());
    let layout = ["--mem", "256M", "--vcpus", "2"];
    let mut dest_args = vec!["vm-incoming", &uri, "--local", "--seconds", "1", "--json"];
    dest_args.extend_from_slice(&layout);
    let dest = livemig(&dest_args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_path(&path);
    let mut src_args = vec![
        "vm-migrate",
        &uri,
        "--local",
        "--working-set",
        "8M",
        "--dirty-rate",
        "64M",
        "--warmup",
        "0.5",
        "--json",
    ];
    src_args.extend_from_slice(&layout);
    let s = json_of("vm-migrate --local", &livemig(&src_args).output().unwrap());
    let d = json_of("vm-incoming --local", &dest.wait_with_output().unwrap());
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["guest"]["self-check"], "passed", "{s}");
    assert_eq!(d["guest"]["self-check"], "passed", "{d}");
    assert!(
        d["guest"]["pages-written"].as_u64() > d["guest"]["pages-written-before"].as_u64(),
        "the guest ran on at the destination: {d}"
    );
    let bytes =
        s["socket-bytes"]["out"].as_u64().unwrap() + s["socket-bytes"]["in"].as_u64().unwrap();
    assert!(bytes < 1 << 20, "{bytes} bytes through the socket");
    assert_eq!(d["memory"], 256 << 20);
    assert!(s["downtime-us"].is_u64(), "{s}");
}

#[test]
fn local_mode_needs_a_unix_socket() {
    let out = livemig(&["vm-migrate", "tcp:127.0.0.1:1", "--local"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unix:PATH"), "{err}");
}

/// What local mode cannot do is refused by name, before any VM, socket or
/// memory is set up (the socket path is never created).
#[test]
fn local_mode_refuses_page_moving_flags_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("never.sock");
    let uri = format!("unix:{}", sock.display());
    let tls = dir.path().join("creds");
    std::fs::create_dir(&tls).unwrap();
    let tls = tls.to_str().unwrap().to_string();
    let cases: &[(&[&str], &str)] = &[
        (
            &["vm-migrate", &uri, "--local", "--channels", "4"],
            "--channels 4",
        ),
        (
            &["vm-migrate", &uri, "--local", "--compress", "zstd"],
            "--compress",
        ),
        (&["vm-migrate", &uri, "--local", "--xbzrle"], "--xbzrle"),
        (&["vm-migrate", &uri, "--local", "--postcopy"], "--postcopy"),
        (
            &["vm-migrate", &uri, "--local", "--tls-dir", &tls],
            "--tls-dir",
        ),
        (
            &["migrate", &uri, "--local", "--channels", "2"],
            "--channels 2",
        ),
        (&["migrate", &uri, "--local", "--xbzrle"], "--xbzrle"),
        (
            &["vm-incoming", &uri, "--local", "--postcopy"],
            "--postcopy",
        ),
        (&["vm-incoming", &uri, "--local", "--lazy"], "--lazy"),
        (&["incoming", &uri, "--local", "--postcopy"], "--postcopy"),
    ];
    for (args, flag) in cases {
        let out = livemig(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted:\n{err}");
        // livemig's own refusal, or clap's for flags it knows conflict.
        assert!(
            err.contains(&format!("--local cannot be combined with {flag}"))
                || err.contains(&format!("'--local' cannot be used with '{flag}'")),
            "{args:?}:\n{err}"
        );
        assert!(!sock.exists(), "{args:?} created the socket");
    }
}
