//! Forwarding a process's stdout/stderr line by line with a rank prefix.
//!
//! Each line is written with one `write_all` under the stream's lock, so
//! lines from different processes never mix. A line longer than
//! `MAX_LINE` is emitted in pieces (each prefixed) rather than buffered
//! without bound; a last line without a newline gets one.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};

const MAX_LINE: usize = 1 << 20;

/// One of a process's output streams, forwarded to the same one of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    /// `"stdout"` or `"stderr"`, as in the line prefix.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// The last line a process wrote on a stream: quoted in start-up errors
/// (e.g. ssh's own complaint when a host is unreachable).
pub type LastLine = Arc<Mutex<String>>;

/// Lines a process wrote that start with a given marker, taken out of its
/// output (`dsmexec --stats-report` collects the ranks' JSON statistics).
#[derive(Clone)]
pub struct Collect {
    /// The prefix that marks a line to collect.
    pub marker: &'static str,
    /// Collected lines, marker removed, in arrival order.
    pub lines: Arc<Mutex<Vec<String>>>,
}

/// Copies `source` to our own `stream` until end of file; lines starting
/// with `collect`'s marker go to it (without the marker) instead.
pub fn forward(
    source: impl Read,
    stream: Stream,
    prefix: Option<String>,
    last: LastLine,
    collect: Option<Collect>,
) {
    let mut reader = BufReader::with_capacity(64 << 10, source);
    let mut line = Vec::with_capacity(256);
    let mut broken_pipe = false;
    loop {
        line.clear();
        if let Some(p) = &prefix {
            line.extend_from_slice(p.as_bytes());
        }
        let start = line.len();
        let complete = match read_line_bounded(&mut reader, &mut line) {
            Ok(0) => return,
            Ok(_) => line.ends_with(b"\n"),
            Err(_) => return,
        };
        if !complete {
            line.push(b'\n');
        }
        let text = String::from_utf8_lossy(&line[start..line.len() - 1]);
        if let Some(collect) = &collect {
            if let Some(rest) = text.strip_prefix(collect.marker) {
                if let Ok(mut lines) = collect.lines.lock() {
                    lines.push(rest.to_string());
                }
                continue;
            }
        }
        if let Ok(mut l) = last.lock() {
            *l = text.into_owned();
        }
        if broken_pipe {
            continue; // keep draining so the process is never blocked on us
        }
        let result = match stream {
            Stream::Stdout => std::io::stdout().lock().write_all(&line),
            Stream::Stderr => std::io::stderr().lock().write_all(&line),
        };
        broken_pipe = result.is_err();
    }
}

/// Appends up to and including the next newline, or at most `MAX_LINE`
/// bytes; returns how many bytes were appended (0 at end of file).
fn read_line_bounded(reader: &mut impl BufRead, out: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(total);
        }
        let room = MAX_LINE - total;
        let (take, done) = match buf.iter().take(room).position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len().min(room), buf.len() >= room),
        };
        out.extend_from_slice(&buf[..take]);
        reader.consume(take);
        total += take;
        if done {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_lines() {
        let data = b"one\ntwo\nlast".to_vec();
        let mut r = BufReader::with_capacity(2, &data[..]);
        let mut out = Vec::new();
        let mut lines = Vec::new();
        loop {
            out.clear();
            if read_line_bounded(&mut r, &mut out).unwrap() == 0 {
                break;
            }
            lines.push(String::from_utf8(out.clone()).unwrap());
        }
        assert_eq!(lines, ["one\n", "two\n", "last"]);

        let long = vec![b'x'; MAX_LINE + 10];
        let mut r = BufReader::new(&long[..]);
        out.clear();
        assert_eq!(read_line_bounded(&mut r, &mut out).unwrap(), MAX_LINE);
    }
}
