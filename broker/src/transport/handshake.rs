//! How far a new connection's client has got with its opening: what the handshake deadline
//! (`limits.handshake_timeout`) waits for before the connection counts as established.
//!
//! The bytes are only watched, never changed or held back: hyper (and rustls) still parse them and
//! refuse what is malformed. The watch decides one thing — whether the client has sent its opening
//! in full — and errs on the side of "yes": a client is released from the deadline at, or before,
//! the point where a real client would be, so the deadline can close a stalled opening but never a
//! healthy connection, however long it then stays idle.
//!
//! What counts as the opening, by the first bytes:
//! - HTTP/2 in clear text (gRPC): the 24-byte client preface and one whole frame after it (the
//!   client's SETTINGS, which RFC 9113 §3.4 requires first).
//! - TLS (a first byte of 22, a handshake record): the TLS handshake and the first application
//!   record after it — the HTTP/2 preface, sealed. Records are only counted, not decrypted: with
//!   TLS 1.2 the opening ends at the first application-data record after the client's encrypted
//!   Finished (a handshake record following its ChangeCipherSpec); with TLS 1.3 every encrypted
//!   record is application data, so it ends at the second (the Finished, then the preface). A
//!   client sending more handshake records (a client certificate) may be released one record
//!   early, never late.
//! - Anything else is HTTP/1.1 (the gateway, gRPC-Web): the end of the first request's head, an
//!   empty line.

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// TLS record content types (RFC 8446 §5.1).
const TLS_CHANGE_CIPHER_SPEC: u8 = 20;
const TLS_HANDSHAKE: u8 = 22;
const TLS_APPLICATION_DATA: u8 = 23;

/// The opening of one connection, fed with every byte the client sends until it is complete.
#[derive(Debug)]
pub(crate) struct Opening {
    state: State,
}

#[derive(Debug)]
enum State {
    /// Too few bytes to tell the protocol: those seen so far, all a prefix of the HTTP/2 preface.
    Undecided(Vec<u8>),
    /// After the HTTP/2 preface, until its first frame is whole.
    Http2(Records<9>),
    /// HTTP/1.1, until the first request head ends: the last bytes seen, to find `\r\n\r\n`
    /// across reads.
    Http1([u8; 3]),
    /// TLS, record by record.
    Tls {
        records: Records<5>,
        /// A ChangeCipherSpec was seen (TLS 1.2's switch to encryption, or TLS 1.3's
        /// compatibility record).
        cipher_changed: bool,
        /// A handshake record came after it: TLS 1.2's encrypted Finished.
        finished_after_change: bool,
        /// Application-data records seen.
        sealed: u32,
    },
    /// The opening is complete.
    Complete,
}

impl Opening {
    /// Nothing seen yet.
    pub(crate) fn new() -> Opening {
        Opening {
            state: State::Undecided(Vec::new()),
        }
    }

    /// Feeds the next bytes received; returns whether the opening is now complete.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> bool {
        if bytes.is_empty() {
            return self.is_complete();
        }
        if let State::Undecided(seen) = &mut self.state {
            let wanted = HTTP2_PREFACE.len() - seen.len();
            let (head, rest) = bytes.split_at(wanted.min(bytes.len()));
            seen.extend_from_slice(head);
            if seen.first() == Some(&TLS_HANDSHAKE) {
                let seen = std::mem::take(seen);
                self.state = State::Tls {
                    records: Records::new(tls_record_len),
                    cipher_changed: false,
                    finished_after_change: false,
                    sealed: 0,
                };
                self.feed(&seen);
            } else if !HTTP2_PREFACE.starts_with(seen) {
                let seen = std::mem::take(seen);
                self.state = State::Http1([0; 3]);
                self.feed(&seen);
            } else if seen.len() < HTTP2_PREFACE.len() {
                return false;
            } else {
                self.state = State::Http2(Records::new(http2_frame_len));
            }
            return self.feed(rest);
        }
        let complete = match &mut self.state {
            State::Undecided(_) | State::Complete => true,
            State::Http2(frames) => frames.feed(bytes, |_| true),
            State::Http1(last) => {
                let mut window = *last;
                let found = bytes.iter().any(|&b| {
                    let ends = window == *b"\r\n\r" && b == b'\n';
                    window = [window[1], window[2], b];
                    ends
                });
                *last = window;
                found
            }
            State::Tls {
                records,
                cipher_changed,
                finished_after_change,
                sealed,
            } => records.feed(bytes, |header| match header[0] {
                TLS_CHANGE_CIPHER_SPEC => {
                    *cipher_changed = true;
                    false
                }
                TLS_HANDSHAKE => {
                    *finished_after_change |= *cipher_changed;
                    false
                }
                TLS_APPLICATION_DATA => {
                    *sealed += 1;
                    *finished_after_change || *sealed >= 2
                }
                // Alerts and anything else: rustls deals with them.
                _ => false,
            }),
        };
        if complete {
            self.state = State::Complete;
        }
        complete
    }

    /// Whether the opening is complete.
    pub(crate) fn is_complete(&self) -> bool {
        matches!(self.state, State::Complete)
    }
}

/// Length-prefixed records (HTTP/2 frames, TLS records) followed across reads: each has a fixed
/// header of `HEADER` bytes that gives the length of the body after it.
#[derive(Debug)]
struct Records<const HEADER: usize> {
    header: [u8; HEADER],
    /// Header bytes of the current record received so far.
    header_seen: usize,
    /// Body bytes of the current record still to come (meaningful once the header is whole).
    body_left: usize,
    body_len: fn(&[u8; HEADER]) -> usize,
}

impl<const HEADER: usize> Records<HEADER> {
    fn new(body_len: fn(&[u8; HEADER]) -> usize) -> Records<HEADER> {
        Records {
            header: [0; HEADER],
            header_seen: 0,
            body_left: 0,
            body_len,
        }
    }

    /// Walks `bytes`, calling `whole` with the header of each record once its body has been
    /// received too; stops (returning true) as soon as `whole` returns true.
    fn feed(&mut self, mut bytes: &[u8], mut whole: impl FnMut(&[u8; HEADER]) -> bool) -> bool {
        loop {
            if self.header_seen < HEADER {
                let take = (HEADER - self.header_seen).min(bytes.len());
                self.header[self.header_seen..self.header_seen + take]
                    .copy_from_slice(&bytes[..take]);
                self.header_seen += take;
                bytes = &bytes[take..];
                if self.header_seen < HEADER {
                    return false;
                }
                self.body_left = (self.body_len)(&self.header);
            }
            let take = self.body_left.min(bytes.len());
            self.body_left -= take;
            bytes = &bytes[take..];
            if self.body_left > 0 {
                return false;
            }
            if whole(&self.header) {
                return true;
            }
            self.header_seen = 0;
            if bytes.is_empty() {
                return false;
            }
        }
    }
}

/// An HTTP/2 frame's payload length: the first 24 bits of its header.
fn http2_frame_len(header: &[u8; 9]) -> usize {
    usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2])
}

/// A TLS record's fragment length: the last two bytes of its header.
fn tls_record_len(header: &[u8; 5]) -> usize {
    usize::from(u16::from_be_bytes([header[3], header[4]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP/2 frame header for a payload of `len` bytes of frame type `kind`.
    fn frame(kind: u8, len: usize) -> Vec<u8> {
        let mut bytes = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0,
            0,
            0,
            0,
            0,
        ];
        bytes.resize(9 + len, 0);
        bytes
    }

    fn tls_record(kind: u8, len: usize) -> Vec<u8> {
        let mut bytes = vec![kind, 3, 3, (len >> 8) as u8, len as u8];
        bytes.resize(5 + len, 0xAB);
        bytes
    }

    /// Feeds `bytes` in pieces of `piece` bytes; returns after how many bytes the opening was
    /// complete, if it was.
    fn complete_after(bytes: &[u8], piece: usize) -> Option<usize> {
        let mut opening = Opening::new();
        let mut fed = 0;
        for chunk in bytes.chunks(piece) {
            fed += chunk.len();
            if opening.feed(chunk) {
                return Some(fed);
            }
        }
        None
    }

    /// Every piece size, from a byte at a time to all at once, gives the same answer.
    fn complete_after_any_split(bytes: &[u8]) -> Option<usize> {
        let whole = complete_after(bytes, bytes.len().max(1)).map(|_| ());
        for piece in 1..=bytes.len().max(1) {
            let split = complete_after(bytes, piece);
            assert_eq!(split.map(|_| ()), whole, "pieces of {piece}");
        }
        complete_after(bytes, 1)
    }

    #[test]
    fn http2_needs_the_preface_and_a_whole_first_frame() {
        let mut opening = HTTP2_PREFACE.to_vec();
        let settings = frame(4, 18);
        opening.extend_from_slice(&settings);
        let len = opening.len();
        opening.extend_from_slice(&frame(8, 4));
        assert_eq!(complete_after_any_split(&opening), Some(len));
        // The preface alone, or with part of the frame, is not enough.
        assert_eq!(complete_after_any_split(&opening[..len - 1]), None);
        assert_eq!(complete_after_any_split(&opening[..24]), None);
        assert_eq!(complete_after_any_split(&opening[..10]), None);
        // An empty SETTINGS frame is whole with its header.
        let mut empty = HTTP2_PREFACE.to_vec();
        empty.extend_from_slice(&frame(4, 0));
        assert_eq!(complete_after_any_split(&empty), Some(33));
    }

    #[test]
    fn http1_needs_the_end_of_the_first_request_head() {
        let request = b"GET /v1/channels HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(complete_after_any_split(request), Some(request.len()));
        assert_eq!(
            complete_after_any_split(&request[..request.len() - 1]),
            None
        );
        // Diverging from the HTTP/2 preface late still makes it HTTP/1.1.
        let odd = b"PRI * HTTP/1.1\r\n\r\n";
        assert_eq!(complete_after_any_split(odd), Some(odd.len()));
        assert_eq!(complete_after_any_split(b"\r\n\r"), None);
        assert_eq!(complete_after_any_split(b"\r\n\r\n"), Some(4));
    }

    #[test]
    fn tls12_needs_an_application_record_after_the_encrypted_finished() {
        let mut bytes = tls_record(TLS_HANDSHAKE, 300); // ClientHello
        bytes.extend(tls_record(TLS_HANDSHAKE, 70)); // ClientKeyExchange
        bytes.extend(tls_record(TLS_CHANGE_CIPHER_SPEC, 1));
        bytes.extend(tls_record(TLS_HANDSHAKE, 40)); // Finished, encrypted
        let before_data = bytes.len();
        bytes.extend(tls_record(TLS_APPLICATION_DATA, 60)); // the preface and SETTINGS
        assert_eq!(complete_after_any_split(&bytes), Some(bytes.len()));
        assert_eq!(complete_after_any_split(&bytes[..before_data]), None);
        assert_eq!(complete_after_any_split(&bytes[..bytes.len() - 1]), None);
    }

    #[test]
    fn tls13_needs_a_second_application_record() {
        for compatibility in [false, true] {
            let mut bytes = tls_record(TLS_HANDSHAKE, 500); // ClientHello
            if compatibility {
                bytes.extend(tls_record(TLS_CHANGE_CIPHER_SPEC, 1));
            }
            bytes.extend(tls_record(TLS_APPLICATION_DATA, 53)); // Finished, sealed
            let finished = bytes.len();
            bytes.extend(tls_record(TLS_APPLICATION_DATA, 80)); // the preface, sealed
            assert_eq!(complete_after_any_split(&bytes), Some(bytes.len()));
            assert_eq!(complete_after_any_split(&bytes[..finished]), None);
        }
        // Only a ClientHello, even a large one split across many reads, is not an opening.
        assert_eq!(
            complete_after_any_split(&tls_record(TLS_HANDSHAKE, 1800)),
            None
        );
    }

    #[test]
    fn nothing_is_not_an_opening_and_a_complete_one_stays_complete() {
        let mut opening = Opening::new();
        assert!(!opening.feed(&[]));
        assert!(!opening.is_complete());
        assert!(opening.feed(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(opening.feed(&[]));
        assert!(opening.feed(b"anything"));
        assert!(opening.is_complete());
    }
}
