//! The machine file: one host per line, ranks in file order.
//!
//! ```text
//! # comment
//! node1            # one process
//! node2 slots=4    # four processes
//! node1            # a host may repeat
//! ```

use std::path::Path;

/// One process of the job: its index in the list is its rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Host to run it on, as written in the machine file (may be `user@host`).
    pub host: String,
}

/// Why a machine file cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MachineFileError {
    /// The file cannot be read.
    #[error("cannot read machine file {path}: {reason}")]
    Unreadable {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The file has no host lines.
    #[error("machine file {path} lists no hosts (one host per line, e.g. `node1 slots=2`)")]
    Empty {
        /// The file.
        path: String,
    },
    /// A line is not `HOST [slots=K]`.
    #[error("machine file {path}, line {line}: {reason}")]
    BadLine {
        /// The file.
        path: String,
        /// Line number, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// Reads and parses the machine file at `path`.
pub fn read(path: &Path) -> Result<Vec<Slot>, MachineFileError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| MachineFileError::Unreadable {
        path: name.clone(),
        reason: e.to_string(),
    })?;
    parse(&text, &name)
}

/// Parses machine file `text` into slots, one per process in file order;
/// `name` identifies the file in errors.
pub fn parse(text: &str, name: &str) -> Result<Vec<Slot>, MachineFileError> {
    let mut slots = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let bad = |reason: String| MachineFileError::BadLine {
            path: name.to_string(),
            line: index + 1,
            reason,
        };
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let host = words.next().unwrap_or_default();
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._:@[]".contains(c))
        {
            return Err(bad(format!("{host:?} is not a host name or address")));
        }
        let mut count = 1;
        for word in words {
            let Some(value) = word.strip_prefix("slots=") else {
                return Err(bad(format!(
                    "unknown attribute {word:?} (expected slots=K)"
                )));
            };
            count = match value.parse::<usize>() {
                Ok(k) if k > 0 => k,
                _ => return Err(bad(format!("slots={value} is not a positive number"))),
            };
        }
        slots.extend((0..count).map(|_| Slot {
            host: host.to_string(),
        }));
    }
    if slots.is_empty() {
        return Err(MachineFileError::Empty {
            path: name.to_string(),
        });
    }
    Ok(slots)
}

/// Hosts that mean "this machine": started without SSH.
pub fn is_local(host: &str, this_host: &str) -> bool {
    let short = this_host.split('.').next().unwrap_or(this_host);
    matches!(
        host,
        "localhost" | "127.0.0.1" | "::1" | "[::1]" | "localhost.localdomain"
    ) || host == this_host
        || host == short
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(text: &str) -> Vec<String> {
        parse(text, "m")
            .unwrap()
            .into_iter()
            .map(|s| s.host)
            .collect()
    }

    #[test]
    fn lines_slots_comments_and_repeats() {
        let text = "# cluster\n\nnode1\n  node2 slots=3  # big one\nnode1\n";
        assert_eq!(hosts(text), ["node1", "node2", "node2", "node2", "node1"]);
    }

    #[test]
    fn bad_lines_name_the_line() {
        let err = parse("node1\nnode2 cpus=3\n", "m").unwrap_err();
        assert_eq!(
            err.to_string(),
            "machine file m, line 2: unknown attribute \"cpus=3\" (expected slots=K)"
        );
        assert!(matches!(
            parse("a slots=0", "m"),
            Err(MachineFileError::BadLine { line: 1, .. })
        ));
        assert!(matches!(
            parse("a slots=x", "m"),
            Err(MachineFileError::BadLine { line: 1, .. })
        ));
        assert!(matches!(
            parse("a;rm -rf /", "m"),
            Err(MachineFileError::BadLine { line: 1, .. })
        ));
    }

    #[test]
    fn empty_files_are_refused() {
        assert!(matches!(
            parse("# nothing\n\n", "m"),
            Err(MachineFileError::Empty { .. })
        ));
    }

    #[test]
    fn local_names() {
        assert!(is_local("localhost", "n1.example"));
        assert!(is_local("n1", "n1.example"));
        assert!(is_local("n1.example", "n1.example"));
        assert!(!is_local("n2", "n1.example"));
    }
}
