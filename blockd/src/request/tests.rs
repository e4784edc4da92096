use super::*;

const CAP: u64 = 2048; // 1 MiB

fn header(kind: u32, sector: u64) -> Option<[u8; HEADER_LEN]> {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    Some(h)
}

fn r(len: u32) -> Segment {
    Segment {
        len,
        writable: false,
    }
}

fn w(len: u32) -> Segment {
    Segment {
        len,
        writable: true,
    }
}

#[test]
fn read_write_flush_get_id() {
    let read = decode(&[r(16), w(4096), w(1)], header(T_IN, 8), CAP).unwrap();
    assert_eq!(
        read,
        Request {
            op: Op::Read {
                offset: 4096,
                len: 4096
            },
            data: 1..2
        }
    );
    let write = decode(&[r(16), r(512), r(1024), w(1)], header(T_OUT, 0), CAP).unwrap();
    assert_eq!(
        write.op,
        Op::Write {
            offset: 0,
            len: 1536
        }
    );
    assert_eq!(write.data, 1..3);
    let flush = decode(&[r(16), w(1)], header(T_FLUSH, 0), CAP).unwrap();
    assert_eq!((flush.op, flush.data), (Op::Flush, 1..1));
    let id = decode(&[r(16), w(20), w(1)], header(T_GET_ID, 0), CAP).unwrap();
    assert_eq!(id.op, Op::GetId { len: 20 });
}

#[test]
fn last_sector_is_in_range_one_past_is_not() {
    assert!(decode(&[r(16), w(512), w(1)], header(T_IN, CAP - 1), CAP).is_ok());
    let err = decode(&[r(16), w(1024), w(1)], header(T_IN, CAP - 1), CAP).unwrap_err();
    assert_eq!(
        err,
        DecodeError::PastCapacity {
            sector: CAP - 1,
            len: 1024
        }
    );
    assert_eq!(err.status(), S_IOERR);
    let err = decode(&[r(16), r(512), w(1)], header(T_OUT, CAP), CAP).unwrap_err();
    assert!(matches!(err, DecodeError::PastCapacity { .. }));
}

#[test]
fn sector_overflow_is_past_capacity() {
    for sector in [u64::MAX, u64::MAX / 512, u64::MAX / 512 - 7] {
        let err = decode(&[r(16), w(4096), w(1)], header(T_IN, sector), u64::MAX).unwrap_err();
        assert!(matches!(err, DecodeError::PastCapacity { .. }), "{sector}");
    }
}

#[test]
fn zero_length_and_unaligned_transfers() {
    assert_eq!(
        decode(&[r(16), w(1)], header(T_IN, 0), CAP).unwrap_err(),
        DecodeError::Unaligned(0)
    );
    assert_eq!(
        decode(&[r(16), w(0), w(1)], header(T_OUT, 0), CAP).unwrap_err(),
        DecodeError::WrongDirection(1)
    );
    assert_eq!(
        decode(&[r(16), r(0), w(1)], header(T_OUT, 0), CAP).unwrap_err(),
        DecodeError::Unaligned(0)
    );
    assert_eq!(
        decode(&[r(16), w(511), w(1)], header(T_IN, 0), CAP).unwrap_err(),
        DecodeError::Unaligned(511)
    );
}

#[test]
fn huge_lengths_are_refused_without_overflow() {
    let err = decode(
        &[r(16), w(u32::MAX), w(u32::MAX), w(1)],
        header(T_IN, 0),
        u64::MAX,
    );
    assert_eq!(err.unwrap_err(), DecodeError::TooLarge);
    let max = MAX_REQUEST_BYTES as u32;
    assert!(decode(&[r(16), w(max), w(1)], header(T_IN, 0), u64::MAX).is_ok());
    assert_eq!(
        decode(&[r(16), w(max), w(512), w(1)], header(T_IN, 0), u64::MAX).unwrap_err(),
        DecodeError::TooLarge
    );
    // Zero-length segments cannot stretch a chain past the segment cap.
    let mut segs = vec![r(16)];
    segs.extend(std::iter::repeat_n(w(0), MAX_SEGMENTS));
    segs.push(w(1));
    assert_eq!(
        decode(&segs, header(T_IN, 0), CAP).unwrap_err(),
        DecodeError::Shape(MAX_SEGMENTS + 2)
    );
}

#[test]
fn malformed_header_and_status() {
    assert_eq!(
        decode(&[], header(T_IN, 0), CAP).unwrap_err(),
        DecodeError::Shape(0)
    );
    assert_eq!(
        decode(&[r(16)], header(T_IN, 0), CAP).unwrap_err(),
        DecodeError::Shape(1)
    );
    // Status not writable, or empty.
    assert_eq!(
        decode(&[r(16), w(512), r(1)], header(T_IN, 0), CAP).unwrap_err(),
        DecodeError::BadStatus
    );
    assert_eq!(
        decode(&[r(16), w(512), w(0)], header(T_IN, 0), CAP).unwrap_err(),
        DecodeError::BadStatus
    );
    assert!(!status_fits(&[r(16), w(0)]));
    // Header writable, short, or unreadable.
    assert_eq!(
        decode(&[w(16), w(512), w(1)], header(T_IN, 0), CAP).unwrap_err(),
        DecodeError::BadHeader
    );
    assert_eq!(
        decode(&[r(8), w(512), w(1)], header(T_IN, 0), CAP).unwrap_err(),
        DecodeError::BadHeader
    );
    assert_eq!(
        decode(&[r(16), w(512), w(1)], None, CAP).unwrap_err(),
        DecodeError::BadHeader
    );
}

#[test]
fn wrong_direction_and_unknown_type() {
    assert_eq!(
        decode(&[r(16), r(512), w(1)], header(T_IN, 0), CAP).unwrap_err(),
        DecodeError::WrongDirection(1)
    );
    assert_eq!(
        decode(&[r(16), r(512), w(512), w(1)], header(T_OUT, 0), CAP).unwrap_err(),
        DecodeError::WrongDirection(2)
    );
    assert_eq!(
        decode(&[r(16), r(20), w(1)], header(T_GET_ID, 0), CAP).unwrap_err(),
        DecodeError::WrongDirection(1)
    );
    let err = decode(&[r(16), w(1)], header(11, 0), CAP).unwrap_err();
    assert_eq!(
        (err, err.status()),
        (DecodeError::Unsupported(11), S_UNSUPP)
    );
    // A flush with stray buffers is still a flush; they are never touched.
    assert!(decode(&[r(16), r(7), w(9), w(1)], header(T_FLUSH, 0), CAP).is_ok());
}

#[test]
fn decode_bytes_never_panics_on_arbitrary_input() {
    let mut seed = 0x1234_5678_9abc_def0u64;
    for round in 0..20_000 {
        let len = round % 200;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = decode_bytes(&bytes);
    }
    assert!(decode_bytes(&[]).is_err());
}

#[test]
fn decode_bytes_layout() {
    let mut input = CAP.to_le_bytes().to_vec();
    input.extend_from_slice(&header(T_IN, 1).unwrap());
    for (len, flags) in [(16u32, 0u8), (512, 1), (1, 1)] {
        input.extend_from_slice(&len.to_le_bytes());
        input.push(flags);
    }
    assert_eq!(
        decode_bytes(&input).unwrap().op,
        Op::Read {
            offset: 512,
            len: 512
        }
    );
}
