//! Sizes and rates as people type them: `1G`, `200M`, `4096`, `1.5GiB`.

/// Parses a byte size with an optional binary suffix (K, M, G, T; an
/// optional `i`/`iB`/`B` after it). Plain numbers are bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 4096, 64K, 200M, 1G)"))?;
    let mult: u64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" | "kb" => 1 << 10,
        "m" | "mi" | "mib" | "mb" => 1 << 20,
        "g" | "gi" | "gib" | "gb" => 1 << 30,
        "t" | "ti" | "tib" | "tb" => 1 << 40,
        other => {
            return Err(format!(
                "'{s}': unknown size suffix '{other}' (use K, M, G or T)"
            ))
        }
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(bytes as u64)
}

/// A size that must be a non-zero multiple of 4096.
pub fn parse_mem_size(s: &str) -> Result<u64, String> {
    let v = parse_size(s)?;
    if v == 0 || v % 4096 != 0 {
        return Err(format!("'{s}' must be a non-zero multiple of 4 KiB"));
    }
    Ok(v)
}

/// Human-readable bytes (binary units).
pub fn human(bytes: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("200M").unwrap(), 200 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5X").unwrap_err().contains("suffix"));
        assert!(parse_mem_size("100").is_err());
        assert!(parse_mem_size("0").is_err());
        assert_eq!(human(3 << 29), "1.5 GiB");
    }
}
