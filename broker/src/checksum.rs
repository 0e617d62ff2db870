//! Checksums on every value the broker stores, so damaged files are noticed, not served.
//!
//! sled checks its own segments, but a value it hands back is whatever bytes the file holds: a
//! flipped bit inside a value, or a file cut short, can come back as a valid-looking record and
//! bincode would decode most of them into wrong data. Every stored value is therefore sealed as
//!
//! ```text
//! [format 0xC5] [crc32 of the payload, u32 LE] [payload]
//! ```
//!
//! and opened with a check of both (the raft log's segment records carry their length and crc32
//! in a header of their own, see `raft::segment`; its metadata files are sealed like this). A
//! failed check is a [`CorruptRecord`], never a default or a skipped record: the log store turns it
//! into a storage error that stops raft on this node (so it neither serves nor votes from bad
//! data), and the message store into `DATA_LOSS` for the reader.
//!
//! CRC-32 (IEEE) through `crc32fast`: it is already in the tree (sled uses it), it runs at memory
//! speed with the CPU's carry-less multiply, and it detects every burst of up to 32 flipped bits;
//! this guards against disk and file damage, not against an adversary.

/// First byte of every sealed value; a different byte means the value was not written by this
/// format (or its first byte is damaged).
const FORMAT: u8 = 0xC5;
/// Format byte and checksum.
pub(crate) const OVERHEAD: usize = 5;

/// A stored value failed its check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CorruptRecord {
    /// Shorter than the header: cut short.
    #[error("truncated value: {len} bytes, shorter than the {OVERHEAD}-byte header")]
    Truncated {
        /// Its length.
        len: usize,
    },
    /// Not in the sealed format.
    #[error("unknown value format 0x{found:02x} (expected 0x{FORMAT:02x})")]
    UnknownFormat {
        /// The first byte found.
        found: u8,
    },
    /// The payload does not match its checksum.
    #[error("checksum mismatch: stored {stored:08x}, computed {computed:08x} over {len} bytes")]
    Mismatch {
        /// The checksum stored with the value.
        stored: u32,
        /// The checksum of the payload as read.
        computed: u32,
        /// The payload's length.
        len: usize,
    },
}

/// `payload` with its header, ready to store.
pub(crate) fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OVERHEAD + payload.len());
    out.push(FORMAT);
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payload of a sealed value, after checking it.
///
/// # Errors
/// [`CorruptRecord`] when the value is too short, not sealed, or does not match its checksum.
pub(crate) fn open(value: &[u8]) -> Result<&[u8], CorruptRecord> {
    let (header, payload) = value
        .split_at_checked(OVERHEAD)
        .ok_or(CorruptRecord::Truncated { len: value.len() })?;
    if header[0] != FORMAT {
        return Err(CorruptRecord::UnknownFormat { found: header[0] });
    }
    let stored = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    verify(stored, payload)?;
    Ok(payload)
}

/// Checks `payload` against the checksum `stored` with it (for formats that keep the checksum in
/// a header of their own, like the raft log's records).
///
/// # Errors
/// [`CorruptRecord::Mismatch`] when they differ.
pub(crate) fn verify(stored: u32, payload: &[u8]) -> Result<(), CorruptRecord> {
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(CorruptRecord::Mismatch {
            stored,
            computed,
            len: payload.len(),
        });
    }
    Ok(())
}

/// A decoding failure of a checked value: either the check or the decoding itself.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    /// The value failed its check.
    #[error(transparent)]
    Corrupt(#[from] CorruptRecord),
    /// The checked bytes did not decode (written by an incompatible version).
    #[error("cannot decode: {0}")]
    Decode(#[from] bincode::Error),
}

/// bincode-encodes `value` and seals it.
///
/// # Errors
/// Only if encoding fails.
pub fn encode<T: serde::Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, bincode::Error> {
    Ok(seal(&bincode::serialize(value)?))
}

/// Checks a sealed value and bincode-decodes its payload.
///
/// # Errors
/// [`DecodeError`] when the check or the decoding fails.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(value: &[u8]) -> Result<T, DecodeError> {
    Ok(bincode::deserialize(open(value)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_to_its_payload() {
        for payload in [&b""[..], b"x", &[7u8; 10_000]] {
            assert_eq!(open(&seal(payload)).unwrap(), payload);
        }
        let value: (u64, String) = decode(&encode(&(42u64, "ada".to_owned())).unwrap()).unwrap();
        assert_eq!(value, (42, "ada".to_owned()));
    }

    #[test]
    fn every_single_flipped_bit_is_detected() {
        let sealed = seal(b"an acknowledged batch of messages");
        for byte in 0..sealed.len() {
            for bit in 0..8 {
                let mut damaged = sealed.clone();
                damaged[byte] ^= 1 << bit;
                assert!(
                    open(&damaged).is_err(),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let sealed = seal(b"an acknowledged batch of messages");
        for len in 0..sealed.len() {
            let err = open(&sealed[..len]).unwrap_err();
            if len < OVERHEAD {
                assert_eq!(err, CorruptRecord::Truncated { len });
            } else {
                assert!(matches!(err, CorruptRecord::Mismatch { .. }), "{err}");
            }
        }
    }

    #[test]
    fn an_unsealed_value_is_refused() {
        let raw = bincode::serialize(&7u64).unwrap();
        assert!(matches!(decode::<u64>(&raw), Err(DecodeError::Corrupt(_))));
    }
}
