//! QMP framing: JSON texts back to back on a byte stream, found by a
//! streaming scanner (no newline needed between them), each bounded in
//! size.

/// What the scanner found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// One complete top-level JSON text (an object, an array, or a stray
    /// scalar or bracket the parser will refuse).
    Text(Vec<u8>),
    /// A text grew past the bound before it ended.
    TooLong,
}

/// Splits a byte stream into top-level JSON texts by tracking brackets and
/// strings; does not validate (serde does that on each text).
#[derive(Debug)]
pub(crate) struct Splitter {
    buf: Vec<u8>,
    limit: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Inside a bare top-level token (number, literal, garbage).
    in_scalar: bool,
    /// After a byte no JSON text can hold: the rest of the line is
    /// dropped.
    skipping: bool,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Whether `b` may appear outside strings in a JSON text: structure,
/// numbers and the letters of `true`, `false`, `null`.
fn json_byte(b: u8) -> bool {
    is_space(b)
        || b.is_ascii_digit()
        || matches!(
            b,
            b'{' | b'}'
                | b'['
                | b']'
                | b':'
                | b','
                | b'"'
                | b'-'
                | b'+'
                | b'.'
                | b'e'
                | b'E'
                | b't'
                | b'r'
                | b'u'
                | b'f'
                | b'a'
                | b'l'
                | b's'
                | b'n'
        )
}

impl Splitter {
    /// A scanner whose texts are at most `limit` bytes.
    pub(crate) fn new(limit: usize) -> Splitter {
        Splitter {
            buf: Vec::new(),
            limit,
            depth: 0,
            in_string: false,
            escaped: false,
            in_scalar: false,
            skipping: false,
        }
    }

    /// Feeds `bytes`, appending every frame they complete to `out`. After
    /// [`Frame::TooLong`] the scanner starts over (the caller usually ends
    /// the session).
    pub(crate) fn feed(&mut self, bytes: &[u8], out: &mut Vec<Frame>) {
        for &b in bytes {
            self.byte(b, out);
            if self.buf.len() > self.limit {
                *self = Splitter::new(self.limit);
                out.push(Frame::TooLong);
            }
        }
    }

    /// End of input: a pending bare token is a text; a half-sent object
    /// is dropped.
    pub(crate) fn finish(&mut self, out: &mut Vec<Frame>) {
        if self.in_scalar && !self.buf.is_empty() {
            out.push(Frame::Text(std::mem::take(&mut self.buf)));
        }
        *self = Splitter::new(self.limit);
    }

    fn emit(&mut self, out: &mut Vec<Frame>) {
        self.in_scalar = false;
        out.push(Frame::Text(std::mem::take(&mut self.buf)));
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.skipping {
            self.skipping = !matches!(b, b'\n' | b'\r');
            return;
        }
        if self.in_string {
            self.buf.push(b);
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    self.emit(out);
                }
            }
            return;
        }
        if self.in_scalar {
            if is_space(b) || matches!(b, b'{' | b'[' | b'}' | b']' | b'"') {
                self.emit(out);
                // The delimiter starts the next text (or is skipped).
            } else {
                self.buf.push(b);
                return;
            }
        }
        if self.depth == 0 {
            match b {
                b if is_space(b) => {}
                b'{' | b'[' => {
                    self.depth = 1;
                    self.buf.push(b);
                }
                b'"' => {
                    self.in_string = true;
                    self.buf.push(b);
                }
                b'}' | b']' => {
                    self.buf.push(b);
                    self.emit(out);
                }
                _ => {
                    self.in_scalar = true;
                    self.buf.push(b);
                }
            }
            return;
        }
        self.buf.push(b);
        if !json_byte(b) {
            // Answer at once (a parse error) instead of waiting for a
            // closing bracket that may never come; drop the line's rest.
            self.emit(out);
            self.depth = 0;
            self.skipping = true;
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    self.emit(out);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[u8], limit: usize) -> Vec<Frame> {
        let mut s = Splitter::new(limit);
        let mut out = Vec::new();
        // Byte by byte: framing must not depend on how reads cut the input.
        for b in input {
            s.feed(std::slice::from_ref(b), &mut out);
        }
        s.finish(&mut out);
        out
    }

    fn texts(input: &str) -> Vec<String> {
        split(input.as_bytes(), 1 << 20)
            .into_iter()
            .map(|f| match f {
                Frame::Text(t) => String::from_utf8(t).unwrap(),
                Frame::TooLong => "TOO LONG".into(),
            })
            .collect()
    }

    #[test]
    fn objects_back_to_back_without_newlines() {
        assert_eq!(
            texts(r#"{"a":1}{"b":{"c":[1,{}]}}  {"d":"}{\"x"}"#),
            [r#"{"a":1}"#, r#"{"b":{"c":[1,{}]}}"#, r#"{"d":"}{\"x"}"#]
        );
    }

    #[test]
    fn stray_scalars_and_brackets_are_texts_of_their_own() {
        assert_eq!(
            texts("42 true}{\"a\":1}\n"),
            ["42", "true", "}", "{\"a\":1}"]
        );
        assert_eq!(texts("\"str\" 7"), ["\"str\"", "7"]);
    }

    #[test]
    fn a_byte_no_json_can_hold_ends_the_text_at_once_and_drops_the_line() {
        assert_eq!(texts("{not json}}}\n{\"a\":1}"), ["{no", "{\"a\":1}"]);
    }

    #[test]
    fn a_half_object_at_the_end_is_dropped() {
        assert_eq!(texts(r#"{"a":1} {"b":"#), [r#"{"a":1}"#]);
    }

    #[test]
    fn an_over_long_text_is_reported_once() {
        let mut input = b"{\"a\":\"".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend(b"\"}");
        let out = split(&input, 50);
        assert_eq!(out[0], Frame::TooLong, "{out:?}");
        let mut small = Vec::new();
        let mut s = Splitter::new(50);
        s.feed(b"{\"ok\":1}", &mut small);
        assert_eq!(small, [Frame::Text(b"{\"ok\":1}".to_vec())]);
    }
}
