//! One user's received lines against its expected stream: exact bytes, in order, nothing
//! missing, nothing extra. Only the first divergence is kept; after it the stream is already
//! wrong and later lines would only repeat the same news.

use serde::Serialize;

use super::stream::{GeneratedEvent, MAX_LINE};

/// Why a user stopped before its stream was complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "reason")]
pub enum Missing {
    /// No byte arrived for this long while a notification was still due.
    Timeout { ms: u64 },
    /// The server closed the connection.
    Closed,
    /// The connection failed.
    Error { message: String },
    /// The run ended first (Ctrl-C, another user's timeout, or a broken event source).
    RunEnded,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Received {
    Line(String),
    Nothing(Missing),
}

/// The first place a user's stream differs from what it should be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Divergence {
    /// 0-based position in the user's stream.
    pub index: usize,
    /// The line due there, terminator included; `None` when nothing more was due.
    pub expected: Option<String>,
    pub received: Received,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at index {}: expected ", self.index)?;
        match &self.expected {
            Some(line) => write!(f, "{line:?}")?,
            None => write!(f, "nothing more")?,
        }
        write!(f, ", received ")?;
        match &self.received {
            Received::Line(line) => write!(f, "{line:?}"),
            Received::Nothing(Missing::Timeout { ms }) => {
                write!(f, "nothing within timeout ({ms} ms)")
            }
            Received::Nothing(Missing::Closed) => write!(f, "nothing (connection closed)"),
            Received::Nothing(Missing::Error { message }) => {
                write!(f, "nothing (connection failed: {message})")
            }
            Received::Nothing(Missing::RunEnded) => write!(f, "nothing before the run ended"),
        }
    }
}

pub struct UserCheck {
    expected: Vec<GeneratedEvent>,
    next: usize,
    crlf: bool,
    divergence: Option<Divergence>,
    received: u64,
}

impl UserCheck {
    pub fn new(expected: Vec<GeneratedEvent>, crlf: bool) -> UserCheck {
        UserCheck {
            expected,
            next: 0,
            crlf,
            divergence: None,
            received: 0,
        }
    }

    /// One received line, terminator included (a final partial line is passed as is).
    pub fn feed(&mut self, line: &[u8]) {
        self.received += 1;
        if self.divergence.is_some() {
            return;
        }
        let Some(event) = self.expected.get(self.next) else {
            self.divergence = Some(Divergence {
                index: self.next,
                expected: None,
                received: Received::Line(String::from_utf8_lossy(line).into_owned()),
            });
            return;
        };
        let mut buf = [0u8; MAX_LINE];
        let len = event.write_line(self.crlf, &mut buf);
        if &buf[..len] == line {
            self.next += 1;
        } else {
            self.divergence = Some(Divergence {
                index: self.next,
                expected: Some(event.line(self.crlf)),
                received: Received::Line(String::from_utf8_lossy(line).into_owned()),
            });
        }
    }

    /// Nothing more is awaited: everything arrived, or the stream already diverged.
    pub fn is_settled(&self) -> bool {
        self.divergence.is_some() || self.next == self.expected.len()
    }

    /// Sequence number of the next notification awaited, if any.
    pub fn next_seq(&self) -> Option<u64> {
        if self.divergence.is_some() {
            return None;
        }
        self.expected.get(self.next).map(GeneratedEvent::seq)
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    /// The verdict once no more lines will come; `why` explains a shortfall.
    pub fn finish(self, why: Missing) -> Option<Divergence> {
        if self.divergence.is_some() {
            return self.divergence;
        }
        let event = self.expected.get(self.next)?;
        Some(Divergence {
            index: self.next,
            expected: Some(event.line(self.crlf)),
            received: Received::Nothing(why),
        })
    }
}

/// Splits the notifications one user connection receives into lines, across reads: the
/// verifier's side (the relay's own splitter for the event source is `SourceLineSplitter`).
#[derive(Default)]
pub struct ReceivedLineSplitter {
    partial: Vec<u8>,
}

/// A line longer than any valid notification plus slack is garbage; it is handed over as is
/// rather than buffered without bound.
const MAX_PARTIAL: usize = 4 * MAX_LINE;

impl ReceivedLineSplitter {
    /// Calls `on_line` with every complete line in `chunk`, returns how many.
    pub fn push(&mut self, mut chunk: &[u8], mut on_line: impl FnMut(&[u8])) -> u64 {
        let mut lines = 0;
        while let Some(end) = chunk.iter().position(|b| *b == b'\n') {
            let (line, rest) = chunk.split_at(end + 1);
            if self.partial.is_empty() {
                on_line(line);
            } else {
                self.partial.extend_from_slice(line);
                on_line(&self.partial);
                self.partial.clear();
            }
            lines += 1;
            chunk = rest;
        }
        self.partial.extend_from_slice(chunk);
        if self.partial.len() > MAX_PARTIAL {
            on_line(&self.partial);
            self.partial.clear();
            lines += 1;
        }
        lines
    }

    /// The unterminated tail, if any, once the connection is done.
    pub fn finish(&mut self, mut on_line: impl FnMut(&[u8])) -> u64 {
        if self.partial.is_empty() {
            return 0;
        }
        on_line(&self.partial);
        self.partial.clear();
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::stream::GeneratedKind;

    fn stream() -> Vec<GeneratedEvent> {
        vec![
            GeneratedEvent::new(3, GeneratedKind::Follow, 7, 1),
            GeneratedEvent::new(8, GeneratedKind::Broadcast, 0, 0),
            GeneratedEvent::new(9, GeneratedKind::Status, 4, 0),
        ]
    }

    fn check_lines(lines: &[&str]) -> UserCheck {
        let mut check = UserCheck::new(stream(), false);
        for line in lines {
            check.feed(line.as_bytes());
        }
        check
    }

    #[test]
    fn the_exact_stream_passes() {
        let check = check_lines(&["3|F|7|1\n", "8|B\n", "9|S|4\n"]);
        assert!(check.is_settled());
        assert_eq!(check.finish(Missing::RunEnded), None);
    }

    #[test]
    fn a_missing_line_is_reported_where_it_was_due() {
        let check = check_lines(&["3|F|7|1\n", "9|S|4\n"]);
        let divergence = check.finish(Missing::RunEnded).unwrap();
        assert_eq!(divergence.index, 1);
        assert_eq!(divergence.expected.as_deref(), Some("8|B\n"));
        assert_eq!(divergence.received, Received::Line("9|S|4\n".into()));
    }

    #[test]
    fn a_swap_is_reported_at_the_first_swapped_line() {
        let check = check_lines(&["8|B\n", "3|F|7|1\n", "9|S|4\n"]);
        let divergence = check.finish(Missing::RunEnded).unwrap();
        assert_eq!(divergence.index, 0);
        assert_eq!(divergence.expected.as_deref(), Some("3|F|7|1\n"));
    }

    #[test]
    fn a_duplicate_or_extra_line_fails() {
        let dup = check_lines(&["3|F|7|1\n", "3|F|7|1\n"]).finish(Missing::RunEnded);
        assert_eq!(dup.unwrap().index, 1);
        let extra = check_lines(&["3|F|7|1\n", "8|B\n", "9|S|4\n", "10|B\n"]);
        let divergence = extra.finish(Missing::RunEnded).unwrap();
        assert_eq!(divergence.index, 3);
        assert_eq!(divergence.expected, None);
        assert_eq!(divergence.received, Received::Line("10|B\n".into()));
    }

    #[test]
    fn the_terminator_is_part_of_the_line() {
        let check = check_lines(&["3|F|7|1\r\n"]);
        assert!(check.is_settled(), "diverged");
        let divergence = check.finish(Missing::RunEnded).unwrap();
        assert_eq!(divergence.received, Received::Line("3|F|7|1\r\n".into()));
        let mut crlf = UserCheck::new(stream(), true);
        crlf.feed(b"3|F|7|1\r\n");
        assert!(
            !crlf.is_settled(),
            "CRLF accepted when the stream uses CRLF"
        );
    }

    #[test]
    fn a_shortfall_names_its_cause() {
        let check = check_lines(&["3|F|7|1\n"]);
        assert!(!check.is_settled());
        assert_eq!(check.next_seq(), Some(8), "what the timeout waits for");
        let divergence = check.finish(Missing::Timeout { ms: 2_000 }).unwrap();
        assert_eq!(divergence.index, 1);
        assert_eq!(
            divergence.to_string(),
            "at index 1: expected \"8|B\\n\", received nothing within timeout (2000 ms)"
        );
    }

    #[test]
    fn nothing_expected_nothing_received_passes() {
        let check = UserCheck::new(Vec::new(), false);
        assert!(check.is_settled());
        assert_eq!(check.finish(Missing::Closed), None);
    }

    #[test]
    fn lines_are_split_across_reads() {
        let mut splitter = ReceivedLineSplitter::default();
        let mut lines: Vec<Vec<u8>> = Vec::new();
        let mut collect = |l: &[u8]| lines.push(l.to_vec());
        assert_eq!(splitter.push(b"1|B\n2|S|", &mut collect), 1);
        assert_eq!(splitter.push(b"4", &mut collect), 0);
        assert_eq!(splitter.push(b"\n3|B\n4|", &mut collect), 2);
        assert_eq!(splitter.finish(&mut collect), 1);
        assert_eq!(
            lines,
            vec![
                b"1|B\n".to_vec(),
                b"2|S|4\n".to_vec(),
                b"3|B\n".to_vec(),
                b"4|".to_vec()
            ]
        );
    }

    #[test]
    fn an_endless_line_is_handed_over_not_buffered() {
        let mut splitter = ReceivedLineSplitter::default();
        let mut count = 0;
        splitter.push(&[b'x'; 1_000], |_| count += 1);
        assert_eq!(count, 1);
    }
}
