//! Smoke test of `livemig bench --quick --json`: every part runs, the JSON
//! has the shape BENCHMARKS.md is written from, and every ratio is a
//! positive number. (The figures themselves are only meaningful from a
//! release build on an otherwise idle machine.)

use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_livemig");

fn num(v: &Value, path: &str) -> f64 {
    let mut cur = v;
    for key in path.split('.') {
        cur = &cur[key];
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {cur}"))
}

fn positive(v: &Value, path: &str) {
    let x = num(v, path);
    assert!(x > 0.0 && x.is_finite(), "{path} = {x}, want > 0");
}

#[test]
fn quick_json() {
    let out = Command::new(BIN)
        .args([
            "bench",
            "--quick",
            "--json",
            "--size",
            "8M",
            "--memcpy-size",
            "8M",
            "--link-bytes",
            "32M",
            "--codec-set",
            "1M",
        ])
        .output()
        .expect("run livemig bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "livemig bench failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"));

    for r in ["memcpy", "tcp_loopback", "unix_socket"] {
        positive(&v, &format!("references.{r}.bytes_per_sec"));
        assert!(!v["references"][r]["samples"].as_array().unwrap().is_empty());
    }

    let codecs = v["codecs"].as_array().expect("codecs rows");
    for want in [
        "memcpy",
        "zero detection",
        "xbzrle encode, 8 bytes changed",
        "xbzrle encode, unchanged page",
        "xbzrle encode, 8 bytes changed, shuffled",
        "xbzrle encode, 8 bytes changed, staged",
        "xbzrle decode",
        "compress lz4",
    ] {
        assert!(
            codecs
                .iter()
                .any(|r| r["name"].as_str().unwrap().starts_with(want)),
            "no codec row starting with {want:?}"
        );
    }
    for r in codecs {
        positive(r, "bytes_per_sec");
        positive(r, "ratio_to_memcpy");
        positive(r, "ratio_to_memcpy_reference");
    }

    let mig = v["migration"].as_array().expect("migration rows");
    for content in ["incompressible", "compressible", "mostly-zero"] {
        assert!(
            mig.iter().any(|r| r["content"] == content),
            "no migration row for {content}"
        );
    }
    assert!(mig.iter().any(|r| r["dest"] == "cold"));
    assert!(mig.iter().any(|r| r["compress"].is_string()));
    for r in mig {
        // An 8 MiB guest takes under 0.5 s at either cap: no capped rows.
        let name = r["name"].as_str().unwrap();
        assert!(!name.contains(" cap"), "{name}: a cap cannot pace 8 MiB");
        let noise = r["noise"].as_bool().expect("noise flag");
        assert_eq!(noise, num(r, "secs") < 0.010, "{name}");
        assert_eq!(r["guest_bytes"], 8 << 20);
        assert_eq!(r["verified"], true, "{}", r["name"]);
        for k in [
            "secs",
            "stream_bytes",
            "guest_bytes_per_sec",
            "stream_bytes_per_sec",
            "stream_ratio_to_link",
            "guest_ratio_to_link",
            "guest_ratio_to_memcpy",
            "ratio_to_limit",
        ] {
            positive(r, k);
        }
    }
    // The capped cases a small guest cannot run are named, with the size
    // that runs them.
    let skipped = v["migration_skipped"].as_array().expect("skipped list");
    assert!(skipped.len() >= 2, "{skipped:?}");
    for s in skipped {
        let s = s.as_str().unwrap();
        assert!(s.contains(" cap") && s.contains("-m "), "{s}");
    }
    // Mostly-zero pages go as zero records: the stream is far smaller
    // than the guest.
    let mz = mig.iter().find(|r| r["content"] == "mostly-zero").unwrap();
    assert!(num(mz, "stream_bytes") < num(mz, "guest_bytes") / 4.0);

    let x = &v["xbzrle"];
    for k in [
        "idle_stream_bytes",
        "median_stream_bytes_off",
        "median_stream_bytes_on",
        "total_bytes_ratio",
        "per_resent_page_ratio",
        "per_page_write_ratio",
    ] {
        positive(x, k);
    }
    let off = x["off"].as_array().unwrap();
    let on = x["on"].as_array().unwrap();
    assert_eq!(off.len(), 1);
    assert_eq!(on.len(), 1);
    assert_eq!(off[0]["pages_xbzrle"], 0);
    assert!(on[0]["pages_xbzrle"].as_u64().unwrap() > 0, "{}", on[0]);
    assert!(off.iter().chain(on).all(|r| r["verified"] == true));
}
