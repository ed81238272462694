use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::thread;

use super::*;

/// A fresh CA with peers `src` and `dst`, both valid for loopback.
fn pki() -> Pki {
    Pki::generate(&["src", "dst"], &["localhost", "127.0.0.1"]).unwrap()
}

fn config(p: &Pki, peer: usize) -> TlsConfig {
    let (_, cert, key) = &p.peers[peer];
    TlsConfig::from_pem(p.ca_cert.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap()
}

fn tcp_any() -> Uri {
    "tcp:127.0.0.1:0".parse().unwrap()
}

/// The error a background `accept` ended with.
fn accept_err(l: TlsListener) -> thread::JoinHandle<TlsError> {
    thread::spawn(move || l.accept().err().expect("the handshake must fail"))
}

fn handshake_parts(e: &TlsError) -> (&str, String, &str) {
    match e {
        TlsError::Handshake { peer, reason, hint } => (peer, reason.to_string(), hint),
        other => panic!("not a handshake error: {other}"),
    }
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = TlsConfig::from_dir(dir.path()).unwrap_err();
    let ca = dir.path().join("ca.pem");
    assert!(matches!(&e, TlsError::Read { what: "CA certificate", path, .. } if *path == ca));
    assert!(e.to_string().contains(&ca.display().to_string()), "{e}");

    let p = pki();
    std::fs::write(&ca, &p.ca_cert).unwrap();
    let e = TlsConfig::from_dir(dir.path()).unwrap_err();
    assert!(
        e.to_string().contains("certificate file") && e.to_string().contains("cert.pem"),
        "{e}"
    );
    std::fs::write(dir.path().join("cert.pem"), &p.peers[0].1).unwrap();
    let e = TlsConfig::from_dir(dir.path()).unwrap_err();
    assert!(e.to_string().contains("key.pem"), "{e}");
}

#[test]
fn bad_pem_contents_are_named() {
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::in_dir(dir.path());
    std::fs::write(&files.ca, "not a certificate\n").unwrap();
    std::fs::write(&files.cert, &p.peers[0].1).unwrap();
    std::fs::write(&files.key, &p.peers[0].2).unwrap();
    let e = TlsConfig::from_files(&files).unwrap_err();
    assert!(
        matches!(&e, TlsError::Pem { what: "CA certificate", path, problem: PemProblem::NoCertificate } if *path == files.ca),
        "{e}"
    );
    assert!(e.to_string().contains("holds no certificate"), "{e}");

    // A certificate where the key should be.
    std::fs::write(&files.ca, &p.ca_cert).unwrap();
    std::fs::write(&files.key, &p.peers[0].1).unwrap();
    let e = TlsConfig::from_files(&files).unwrap_err();
    assert!(
        matches!(&e, TlsError::Pem { what: "private key", path, problem: PemProblem::NoKey } if *path == files.key),
        "{e}"
    );

    // Another peer's key: the pair does not match.
    std::fs::write(&files.key, &p.peers[1].2).unwrap();
    let e = TlsConfig::from_files(&files).unwrap_err();
    assert!(matches!(e, TlsError::KeyPair { .. }), "{e}");
    assert!(e.to_string().contains("cert.pem"), "{e}");
}

#[test]
fn server_name_comes_from_the_uri() {
    let c = config(&pki(), 0);
    let name = |u: &str| c.server_name_for(&u.parse().unwrap()).unwrap();
    assert_eq!(
        name("tcp:127.0.0.1:4444"),
        ServerName::IpAddress("127.0.0.1".parse::<IpAddr>().unwrap().into())
    );
    assert_eq!(
        name("tcp:[::1]:4444"),
        ServerName::IpAddress("::1".parse::<IpAddr>().unwrap().into())
    );
    assert_eq!(
        name("tcp:dst.example:4444"),
        ServerName::try_from("dst.example").unwrap()
    );
    assert_eq!(
        name("unix:/tmp/x"),
        ServerName::try_from("localhost").unwrap()
    );
    let c = c.with_server_name("dst").unwrap();
    assert_eq!(
        name_of(&c, "tcp:127.0.0.1:1"),
        ServerName::try_from("dst").unwrap()
    );
}

fn name_of(c: &TlsConfig, u: &str) -> ServerName<'static> {
    c.server_name_for(&u.parse().unwrap()).unwrap()
}

/// Moves `len` bytes source → destination and an answer back, checking
/// every byte, and returns both sides' sessions.
fn round_trip(uri: Uri, src: TlsConfig, dst: TlsConfig, len: usize) -> (TlsSession, TlsSession) {
    let l = TlsListener::bind(&uri, &dst).unwrap();
    let uri = l.local_uri();
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
    let expect = data.clone();
    let server = thread::spawn(move || {
        let (mut inc, s) = l.accept_with_session().unwrap();
        let mut got = vec![0u8; expect.len()];
        inc.reader.read_exact(&mut got).unwrap();
        assert!(got == expect, "the destination read other bytes");
        let ack = inc.ack.as_mut().unwrap();
        ack.write_all(b"loaded").unwrap();
        ack.flush().unwrap();
        // Nothing after the data, then a clean end (close_notify) once the
        // source has dropped both halves.
        let mut rest = Vec::new();
        inc.reader.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        s
    });
    let (out, s) = connect_with_session(&uri, &src).unwrap();
    let mut writer = out.writer;
    let mut ack = out.ack.unwrap();
    for chunk in data.chunks(100_000) {
        writer.write_all(chunk).unwrap();
    }
    writer.flush().unwrap();
    drop(writer);
    let mut answer = [0u8; 6];
    ack.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"loaded");
    drop(ack);
    (s, server.join().unwrap())
}

#[test]
fn tcp_handshake_moves_data_both_ways() {
    let p = pki();
    let (c, s) = round_trip(tcp_any(), config(&p, 0), config(&p, 1), 3 << 20);
    for session in [&c, &s] {
        assert_eq!(session.protocol, "TLSv1_3");
        assert_eq!(session.cipher_suite, CIPHER_SUITES[0]);
    }
    assert!(c.peer.starts_with("127.0.0.1:"), "{}", c.peer);
}

#[test]
fn unix_handshake_moves_data_both_ways() {
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    let uri = Uri::Unix(dir.path().join("s"));
    let (c, _) = round_trip(uri, config(&p, 0), config(&p, 1), 1 << 20);
    assert_eq!(c.cipher_suite, CIPHER_SUITES[0]);
}

#[test]
fn destination_with_another_ca_is_refused() {
    let (a, b) = (pki(), pki());
    let l = TlsListener::bind(&tcp_any(), &config(&b, 1)).unwrap();
    let uri = l.local_uri();
    let server = accept_err(l);
    let e = connect(&uri, &config(&a, 0)).err().unwrap();
    let (peer, reason, hint) = handshake_parts(&e);
    assert_eq!(format!("tcp:{peer}"), uri.to_string());
    assert!(reason.contains("UnknownIssuer"), "{e}");
    assert!(hint.contains("signed by this side's CA"), "{e}");
    assert!(
        matches!(
            &e,
            TlsError::Handshake {
                reason: HandshakeFailure::Tls(_),
                ..
            }
        ),
        "rustls's own error is kept: {e:?}"
    );
    let e = server.join().unwrap();
    let (_, _, hint) = handshake_parts(&e);
    assert!(hint.contains("refused this side's certificate"), "{e}");
}

#[test]
fn source_with_another_ca_is_refused() {
    let (a, b) = (pki(), pki());
    let l = TlsListener::bind(&tcp_any(), &config(&a, 1)).unwrap();
    let uri = l.local_uri();
    let server = accept_err(l);
    // Trusts the destination's CA, but its own certificate is from another.
    let (_, cert, key) = &b.peers[0];
    let src = TlsConfig::from_pem(a.ca_cert.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap();
    let e = connect(&uri, &src).err().unwrap();
    let (_, _, hint) = handshake_parts(&e);
    assert!(hint.contains("refused this side's certificate"), "{e}");
    let e = server.join().unwrap();
    let (peer, reason, _) = handshake_parts(&e);
    assert!(peer.starts_with("127.0.0.1:"), "{e}");
    assert!(reason.contains("UnknownIssuer"), "{e}");
}

#[test]
fn source_without_a_certificate_is_refused() {
    let p = pki();
    let l = TlsListener::bind(&tcp_any(), &config(&p, 1)).unwrap();
    let uri = l.local_uri();
    let server = accept_err(l);
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(CertificateDer::pem_slice_iter(p.ca_cert.as_bytes()).flatten());
    let cfg = ClientConfig::builder_with_provider(crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut conn = ClientConnection::new(
        Arc::new(cfg),
        ServerName::try_from("127.0.0.1").unwrap().to_owned(),
    )
    .unwrap();
    let Uri::Tcp(addr) = &uri else { unreachable!() };
    let mut sock = TcpStream::connect(addr).unwrap();
    // The client's part of the handshake completes; the refusal comes as
    // an alert on its first read.
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).unwrap();
    }
    let mut buf = [0u8; 8];
    let r = loop {
        match conn.reader().read(&mut buf) {
            Ok(n) => break Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => break Err(e),
        }
        if let Err(e) = conn.complete_io(&mut sock) {
            break Err(e);
        }
    };
    let e = r.expect_err("the destination must refuse a source without a certificate");
    assert!(e.to_string().contains("CertificateRequired"), "{e}");
    let e = server.join().unwrap();
    let (_, reason, hint) = handshake_parts(&e);
    assert!(reason.contains("no certificates"), "{e}");
    assert_eq!(hint, "the peer presented no certificate");
}

#[test]
fn plain_source_is_refused_and_the_listener_goes_on() {
    let p = pki();
    let l = TlsListener::bind(&tcp_any(), &config(&p, 1)).unwrap();
    let uri = l.local_uri();
    let Uri::Tcp(addr) = uri.clone() else {
        unreachable!()
    };
    let plain = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"LVMGSTRM plain stream header").unwrap();
        peer_answered_tls(&mut s)
    });
    let e = l.accept().err().expect("a plain peer must be refused");
    assert!(e.is_handshake());
    let (_, _, hint) = handshake_parts(&e);
    assert!(hint.contains("is the peer using TLS"), "{e}");
    assert!(
        e.to_string().starts_with("TLS handshake with 127.0.0.1:"),
        "{e}"
    );
    assert!(plain.join().unwrap(), "the plain peer must see a TLS alert");
    // The listener still serves a proper source.
    let client = thread::spawn(move || {
        let mut out = connect(&uri, &config(&p, 0)).unwrap();
        out.writer.write_all(b"hello").unwrap();
    });
    let mut inc = l.accept().unwrap();
    let mut got = [0u8; 5];
    inc.reader.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    client.join().unwrap();
}

#[test]
fn plain_destination_is_refused() {
    let p = pki();
    let l = Listener::bind(&tcp_any()).unwrap();
    let uri = l.local_uri();
    let server = thread::spawn(move || {
        let mut inc = l.accept().unwrap();
        let mut head = [0u8; 8];
        inc.reader.read_exact(&mut head).unwrap();
        // What a plain destination does with a bad stream: a negative ack.
        let ack = inc.ack.as_mut().unwrap();
        crate::engine::write_reply(
            &mut **ack,
            &crate::engine::Reply::Failed("bad magic".into()),
        )
        .unwrap();
        looks_like_tls(&head)
    });
    let e = connect(&uri, &config(&p, 0)).err().unwrap();
    let (_, _, hint) = handshake_parts(&e);
    assert!(hint.contains("is the peer using TLS"), "{e}");
    assert!(server.join().unwrap(), "a ClientHello must look like TLS");
}

#[test]
fn wrong_server_name_is_refused() {
    let p = pki();
    let l = TlsListener::bind(&tcp_any(), &config(&p, 1)).unwrap();
    let uri = l.local_uri();
    let server = accept_err(l);
    let src = config(&p, 0).with_server_name("elsewhere").unwrap();
    let e = connect(&uri, &src).err().unwrap();
    let (_, _, hint) = handshake_parts(&e);
    assert!(hint.contains("--tls-server-name"), "{e}");
    assert!(server.join().unwrap().is_handshake());
}

#[test]
fn files_are_refused_tls() {
    let p = pki();
    let e = connect(&"file:/tmp/x".parse().unwrap(), &config(&p, 0))
        .err()
        .unwrap();
    assert!(matches!(e, TlsError::Unsupported(_)), "{e}");
}

#[test]
fn generated_files_load_and_keys_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki();
    p.write_to(dir.path()).unwrap();
    for name in ["src", "dst"] {
        let d = dir.path().join(name);
        TlsConfig::from_dir(&d).unwrap();
        let mode = std::fs::metadata(d.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0);
    let bad = Pki::generate(&["../x"], &[]).unwrap();
    assert!(bad.write_to(dir.path()).is_err());
}

#[test]
fn tls_records_are_recognised() {
    assert!(looks_like_tls(&[22, 3, 1, 0, 200]));
    assert!(looks_like_tls(&[21, 3, 3]));
    assert!(!looks_like_tls(b"LVMGACK1"));
    assert!(!looks_like_tls(&[22]));
}

#[test]
fn deferred_connections_handshake_on_first_write() {
    // The multi-channel pattern: the source opens every connection, then
    // writes; the destination accepts each only after reading the previous.
    let p = pki();
    let l = TlsListener::bind(&tcp_any(), &config(&p, 1)).unwrap();
    let uri = l.local_uri();
    let server = thread::spawn(move || {
        let mut got = Vec::new();
        for _ in 0..3 {
            let mut inc = l.accept().unwrap();
            let mut b = [0u8; 1];
            inc.reader.read_exact(&mut b).unwrap();
            got.push(b[0]);
        }
        got
    });
    let src = config(&p, 0);
    let mut conns: Vec<_> = (0..3)
        .map(|_| connect_deferred(&uri, &src).unwrap())
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.writer.write_all(&[i as u8]).unwrap();
        c.writer.flush().unwrap();
    }
    assert_eq!(server.join().unwrap(), vec![0, 1, 2]);
}

#[test]
fn deferred_connection_reports_a_refusal_on_write() {
    let (a, b) = (pki(), pki());
    let l = TlsListener::bind(&tcp_any(), &config(&b, 1)).unwrap();
    let uri = l.local_uri();
    let server = accept_err(l);
    let mut out = connect_deferred(&uri, &config(&a, 0)).unwrap();
    let e = out.writer.write_all(b"x").unwrap_err();
    assert!(e.to_string().contains("TLS handshake with"), "{e}");
    // The other half reports the same failure.
    let e = out.ack.unwrap().read(&mut [0u8; 1]).unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    assert!(server.join().unwrap().is_handshake());
}

#[test]
fn a_silent_peer_times_out_after_the_io_timeout() {
    let p = pki();
    let l = TlsListener::bind(&tcp_any(), &config(&p, 1)).unwrap();
    let uri = l.local_uri();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let server = thread::spawn(move || {
        let inc = l.accept().unwrap();
        // Silent until the source has given up.
        let _ = rx.recv();
        drop(inc);
    });
    let src = config(&p, 0).with_io_timeout(Duration::from_millis(200));
    let mut out = connect(&uri, &src).unwrap();
    let e = out.ack.as_mut().unwrap().read(&mut [0u8; 8]).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    tx.send(()).unwrap();
    server.join().unwrap();
}

#[test]
fn source_certificate_without_client_use_is_refused() {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose as Eku, IsCa, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let leaf = |ekus: Vec<Eku>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        p.extended_key_usages = ekus;
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        TlsConfig::from_pem(
            ca.pem().as_bytes(),
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
        )
        .unwrap()
    };
    let dst = leaf(vec![Eku::ServerAuth, Eku::ClientAuth]);
    let src = leaf(vec![Eku::ServerAuth]);
    let l = TlsListener::bind(&tcp_any(), &dst).unwrap();
    let uri = l.local_uri();
    let server = accept_err(l);
    assert!(connect(&uri, &src).is_err());
    let e = server.join().unwrap();
    let (_, _, hint) = handshake_parts(&e);
    assert!(hint.contains("clientAuth"), "{e}");
}
