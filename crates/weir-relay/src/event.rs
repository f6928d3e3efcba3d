//! One line from the event source, parsed.
//!
//! The payload is kept byte for byte (terminator included) because clients must receive
//! exactly what the source sent. It is copied out of the read buffer on purpose: a slice
//! into a shared buffer would let one straggling event pin a whole 64 KiB read chunk in the
//! reorder window, and memory must be bounded by the number of held events alone.

use std::fmt;

/// The largest sequence number accepted: 2^53 − 1, the largest integer every JSON reader
/// holds exactly (the state file stores the next number), and more than a stream of 10M
/// events a second reaches in 28 years. So a state file or event beyond it is corrupt, not a
/// long stream, and "the number after the last one handled" fits in a `u64` with room to
/// spare: nothing that counts sequence numbers wraps.
pub const MAX_SEQUENCE: u64 = (1 << 53) - 1;

/// Kinds of event, with the letter the protocol uses for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `seq|F|from|to`: `to` is notified; `from` now follows `to`.
    Follow,
    /// `seq|U|from|to`: nobody is notified; `from` no longer follows `to`.
    Unfollow,
    /// `seq|B`: every connected client is notified.
    Broadcast,
    /// `seq|P|from|to`: `to` is notified.
    Private,
    /// `seq|S|from`: every follower of `from` is notified.
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub kind: Kind,
    /// Zero where the kind has no such field.
    pub from: u64,
    pub to: u64,
    pub payload: Payload,
}

/// Why a line was rejected. `seq` is set when the sequence number itself was readable, so
/// that the relay can count that number as handled and the stream does not stall on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub seq: Option<u64>,
    pub reason: &'static str,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.seq {
            Some(seq) => write!(f, "{} (sequence number {seq})", self.reason),
            None => f.write_str(self.reason),
        }
    }
}

/// Parses one line, `line` ending in `\n` or `\r\n` (the terminator is optional here; the
/// source session decides what an unterminated line means).
pub fn parse(line: &[u8]) -> Result<Event, Malformed> {
    let body = strip_terminator(line);
    let mut fields = body.split(|&byte| byte == b'|');
    let seq_field = fields.next().unwrap_or_default();
    let seq = parse_id(seq_field).ok_or(Malformed {
        seq: None,
        reason: "bad sequence number",
    })?;
    if seq == 0 {
        return Err(Malformed {
            seq: None,
            reason: "sequence numbers start at 1",
        });
    }
    if seq > MAX_SEQUENCE {
        return Err(Malformed {
            seq: None,
            reason: "sequence number out of range",
        });
    }
    let fail = |reason| Malformed {
        seq: Some(seq),
        reason,
    };
    let kind = match fields.next() {
        Some(b"F") => Kind::Follow,
        Some(b"U") => Kind::Unfollow,
        Some(b"B") => Kind::Broadcast,
        Some(b"P") => Kind::Private,
        Some(b"S") => Kind::Status,
        Some(_) => return Err(fail("unknown event type")),
        None => return Err(fail("missing event type")),
    };
    let wanted_ids = match kind {
        Kind::Broadcast => 0,
        Kind::Status => 1,
        Kind::Follow | Kind::Unfollow | Kind::Private => 2,
    };
    let mut ids = [0u64; 2];
    for slot in ids.iter_mut().take(wanted_ids) {
        let field = fields.next().ok_or(fail("missing user id"))?;
        *slot = parse_id(field).ok_or(fail("bad user id"))?;
    }
    if fields.next().is_some() {
        return Err(fail("too many fields"));
    }
    Ok(Event {
        seq,
        kind,
        from: ids[0],
        to: ids[1],
        payload: Payload::new(line),
    })
}

/// The sequence number at the start of a line that is otherwise unusable (too long, say),
/// so the relay can still mark that number as handled.
pub fn leading_seq(line: &[u8]) -> Option<u64> {
    let end = line.iter().position(|&byte| byte == b'|')?;
    parse_id(&line[..end]).filter(|&seq| (1..=MAX_SEQUENCE).contains(&seq))
}

/// A user id as the clients send it: the line, trimmed of whitespace.
pub fn parse_user_id(line: &[u8]) -> Option<u64> {
    parse_id(line.trim_ascii())
}

fn strip_terminator(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Decimal digits only: `str::parse` would also accept a leading `+`, which the protocol
/// does not.
fn parse_id(field: &[u8]) -> Option<u64> {
    if field.is_empty() {
        return None;
    }
    field.iter().try_fold(0u64, |acc, &byte| {
        let digit = byte.checked_sub(b'0').filter(|digit| *digit <= 9)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The line as read, stored inline when short (nearly always) so that parsing an event
/// does not allocate.
#[derive(Clone, PartialEq, Eq)]
pub enum Payload {
    Inline {
        len: u8,
        bytes: [u8; Payload::INLINE],
    },
    Heap(Box<[u8]>),
}

impl Payload {
    const INLINE: usize = 38;

    pub fn new(line: &[u8]) -> Payload {
        if line.len() <= Self::INLINE {
            let mut bytes = [0u8; Self::INLINE];
            bytes[..line.len()].copy_from_slice(line);
            // The length fits: it is at most INLINE.
            Payload::Inline {
                len: line.len() as u8,
                bytes,
            }
        } else {
            Payload::Heap(line.into())
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Payload::Heap(bytes) => bytes,
        }
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(line: &str) -> Event {
        parse(line.as_bytes()).unwrap_or_else(|err| panic!("{line:?}: {err}"))
    }

    fn bad(line: &str) -> Malformed {
        parse(line.as_bytes()).expect_err(line)
    }

    #[test]
    fn the_five_kinds_from_the_brief() {
        let follow = ok("666|F|60|50\n");
        assert_eq!(
            (follow.seq, follow.kind, follow.from, follow.to),
            (666, Kind::Follow, 60, 50)
        );
        let unfollow = ok("1|U|12|9\n");
        assert_eq!(
            (unfollow.seq, unfollow.kind, unfollow.from, unfollow.to),
            (1, Kind::Unfollow, 12, 9)
        );
        let broadcast = ok("542532|B\n");
        assert_eq!((broadcast.seq, broadcast.kind), (542532, Kind::Broadcast));
        let private = ok("43|P|32|56\n");
        assert_eq!(
            (private.kind, private.from, private.to),
            (Kind::Private, 32, 56)
        );
        let status = ok("634|S|32\n");
        assert_eq!((status.kind, status.from), (Kind::Status, 32));
    }

    #[test]
    fn the_payload_is_the_line_as_read_with_its_terminator() {
        assert_eq!(ok("7|S|1\r\n").payload.as_bytes(), b"7|S|1\r\n");
        assert_eq!(ok("7|S|1\n").payload.as_bytes(), b"7|S|1\n");
        assert_eq!(ok("7|S|1").payload.as_bytes(), b"7|S|1");
        let long = format!("{}|S|{}\n", MAX_SEQUENCE, u64::MAX);
        assert_eq!(ok(&long).payload.as_bytes(), long.as_bytes());
    }

    #[test]
    fn malformed_lines_say_why_and_keep_a_readable_sequence_number() {
        assert_eq!(
            bad("x|B\n"),
            Malformed {
                seq: None,
                reason: "bad sequence number"
            }
        );
        assert_eq!(bad("+5|B\n").seq, None);
        assert_eq!(bad("0|B\n").reason, "sequence numbers start at 1");
        assert_eq!(bad("18446744073709551616|B\n").seq, None, "overflows u64");
        assert_eq!(
            bad("18446744073709551615|B\n").reason,
            "sequence number out of range"
        );
        assert_eq!(
            bad("9007199254740992|B\n").reason,
            "sequence number out of range",
            "past 2^53 - 1"
        );
        assert_eq!(
            bad("5|X|1|2\n"),
            Malformed {
                seq: Some(5),
                reason: "unknown event type"
            }
        );
        assert_eq!(bad("5\n").reason, "missing event type");
        assert_eq!(bad("5|F|1\n").reason, "missing user id");
        assert_eq!(bad("5|F|1|\n").reason, "bad user id");
        assert_eq!(bad("5|F|1| 2\n").reason, "bad user id");
        assert_eq!(bad("5|B|1\n").reason, "too many fields");
        assert_eq!(bad("5|S|1|2\n").reason, "too many fields");
        assert_eq!(bad("5|FF|1|2\n").reason, "unknown event type");
        assert_eq!(bad("\n").seq, None);
        assert_eq!(bad("").seq, None);
    }

    #[test]
    fn user_ids_are_trimmed_digits() {
        assert_eq!(parse_user_id(b" 2932\r\n"), Some(2932));
        assert_eq!(parse_user_id(b"2932"), Some(2932));
        assert_eq!(parse_user_id(b"29 32\n"), None);
        assert_eq!(parse_user_id(b"-1\n"), None);
        assert_eq!(parse_user_id(b"\n"), None);
    }

    #[test]
    fn leading_seq_reads_the_number_before_the_first_bar() {
        assert_eq!(leading_seq(b"42|S|garbage..."), Some(42));
        assert_eq!(leading_seq(b"42"), None);
        assert_eq!(leading_seq(b"0|B"), None);
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_fail_without_panicking(line in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse(&line);
        }

        #[test]
        fn well_formed_lines_round_trip(seq in 1u64..=MAX_SEQUENCE, from in any::<u64>(), to in any::<u64>(), crlf in any::<bool>()) {
            let end = if crlf { "\r\n" } else { "\n" };
            let line = format!("{seq}|F|{from}|{to}{end}");
            let event = parse(line.as_bytes()).unwrap();
            prop_assert_eq!((event.seq, event.from, event.to), (seq, from, to));
            prop_assert_eq!(event.payload.as_bytes(), line.as_bytes());
        }
    }
}
