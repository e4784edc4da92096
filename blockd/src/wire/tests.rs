use super::*;

fn frame(body: Body) -> Frame {
    Frame {
        volume: "vol-1".into(),
        epoch: 7,
        seq: 42,
        body,
    }
}

fn every_kind() -> Vec<Frame> {
    vec![
        frame(Body::Hello { capacity: 1 << 30 }),
        frame(Body::Write {
            offset: 4096,
            data: vec![0xab; 4096],
        }),
        frame(Body::Flush),
        frame(Body::Read {
            offset: 512,
            len: 1024,
        }),
        frame(Body::ReadData {
            offset: 512,
            data: (0..=255).collect(),
        }),
        frame(Body::Ack {
            offset: 4096,
            len: 4096,
        }),
        frame(Body::Nack {
            code: NackCode::Fenced,
            request_epoch: 6,
            message: "epoch 6 is older than 7".into(),
        }),
        frame(Body::Checksums {
            offset: 1 << 20,
            len: 4 << 20,
            region_shift: 20,
        }),
        frame(Body::Sums {
            offset: 1 << 20,
            region_shift: 20,
            sums: vec![0xdead_beef, 0, 7, u32::MAX],
        }),
    ]
}

/// Rewrites the header CRC after a test edited header bytes, so the check
/// under test is the one that fires.
fn reseal(bytes: &mut [u8]) {
    let vlen = usize::from(bytes[7]);
    let crc = header_crc(&bytes[..40], &bytes[HEADER_LEN..HEADER_LEN + vlen]);
    bytes[40..44].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn crc32c_known_vectors() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(b""), 0);
    assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
}

#[test]
fn every_kind_round_trips_and_its_bytes_are_canonical() {
    for f in every_kind() {
        let bytes = encode(&f).unwrap();
        assert_eq!(frame_len(&bytes).unwrap(), Some(bytes.len()));
        let (back, used) = decode(&bytes).unwrap().unwrap();
        assert_eq!(back, f);
        assert_eq!(used, bytes.len());
        assert_eq!(encode(&back).unwrap(), bytes);
    }
}

#[test]
fn truncated_input_waits_at_every_length() {
    for f in every_kind() {
        let bytes = encode(&f).unwrap();
        for n in 0..bytes.len() {
            assert_eq!(decode(&bytes[..n]), Ok(None), "{:?} cut at {n}", f.body);
        }
    }
}

#[test]
fn a_stream_decodes_frame_after_frame() {
    let mut stream = Vec::new();
    for f in every_kind() {
        stream.extend(encode(&f).unwrap());
    }
    let mut at = 0;
    let mut got = Vec::new();
    while let Some((f, n)) = decode(&stream[at..]).unwrap() {
        got.push(f);
        at += n;
    }
    assert_eq!(at, stream.len());
    assert_eq!(got, every_kind());
}

#[test]
fn bad_magic_version_and_kind_fail_early() {
    let bytes = encode(&frame(Body::Flush)).unwrap();
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(matches!(decode(&b[..4]), Err(WireError::BadMagic(_))));
    let mut b = bytes.clone();
    b[4] = 2;
    assert_eq!(decode(&b[..5]), Err(WireError::BadVersion(2)));
    let mut b = bytes.clone();
    b[5] = 0;
    assert_eq!(decode(&b[..6]), Err(WireError::BadKind(0)));
    b[5] = 10;
    assert_eq!(decode(&b), Err(WireError::BadKind(10)));
}

#[test]
fn a_flipped_header_bit_is_caught_by_the_header_crc() {
    let bytes = encode(&frame(Body::Write {
        offset: 4096,
        data: vec![1; 512],
    }))
    .unwrap();
    // Epoch, sequence, offset, length and the volume id are all covered.
    for at in [8, 16, 24, 32, HEADER_LEN] {
        let mut b = bytes.clone();
        b[at] ^= 0x10;
        assert!(
            matches!(decode(&b), Err(WireError::HeaderCrc { .. })),
            "byte {at}"
        );
    }
}

#[test]
fn a_corrupt_payload_is_caught_by_the_data_crc() {
    let mut bytes = encode(&frame(Body::Write {
        offset: 0,
        data: vec![7; 4096],
    }))
    .unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    assert!(matches!(decode(&bytes), Err(WireError::DataCrc { .. })));
}

#[test]
fn oversize_lengths_are_refused_before_the_payload_arrives() {
    let mut b = encode(&frame(Body::Write {
        offset: 0,
        data: vec![0; 16],
    }))
    .unwrap();
    b[32..36].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    reseal(&mut b);
    // Only the header is there: the error does not wait for 4 MiB.
    assert!(matches!(
        frame_len(&b[..HEADER_LEN + 5]),
        Err(WireError::TooLong { .. })
    ));
    let mut b = encode(&frame(Body::Read { offset: 0, len: 1 })).unwrap();
    b[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
    reseal(&mut b);
    assert!(matches!(decode(&b), Err(WireError::TooLong { .. })));
    let nack = Body::Nack {
        code: NackCode::Io,
        request_epoch: 1,
        message: "x".repeat(MAX_MESSAGE + 1),
    };
    assert!(matches!(
        encode(&frame(nack)),
        Err(WireError::TooLong { .. })
    ));
    let write = Body::Write {
        offset: 0,
        data: vec![0; MAX_PAYLOAD as usize + 1],
    };
    assert!(matches!(
        encode(&frame(write)),
        Err(WireError::TooLong { .. })
    ));
}

#[test]
fn offset_plus_length_must_not_overflow() {
    let read = Body::Read {
        offset: u64::MAX - 10,
        len: 11,
    };
    assert!(matches!(
        encode(&frame(read)),
        Err(WireError::Overflow { .. })
    ));
    let mut b = encode(&frame(Body::Read { offset: 0, len: 11 })).unwrap();
    b[24..32].copy_from_slice(&(u64::MAX - 10).to_le_bytes());
    reseal(&mut b);
    assert_eq!(
        decode(&b),
        Err(WireError::Overflow {
            offset: u64::MAX - 10,
            len: 11
        })
    );
}

#[test]
fn volume_ids_are_bounded_and_safe_as_file_names() {
    for bad in ["", ".", "..", "../x", "a/b", "a b", "é", &"v".repeat(65)] {
        assert!(!valid_volume_id(bad), "{bad:?}");
        let mut f = frame(Body::Flush);
        f.volume = bad.to_string();
        assert_eq!(encode(&f), Err(WireError::BadVolumeId), "{bad:?}");
    }
    for good in ["v", "vol-0123abcd", "a.b_c", &"v".repeat(64)] {
        assert!(valid_volume_id(good), "{good:?}");
    }
    let mut b = encode(&frame(Body::Flush)).unwrap();
    b[7] = 0;
    assert_eq!(decode(&b), Err(WireError::BadVolumeId));
    b[7] = 65;
    assert_eq!(decode(&b), Err(WireError::BadVolumeId));
    let mut b = encode(&frame(Body::Flush)).unwrap();
    b[HEADER_LEN] = b'/';
    reseal(&mut b);
    assert_eq!(decode(&b), Err(WireError::BadVolumeId));
}

#[test]
fn checksum_frames_need_a_region_shift_in_range_and_whole_sums() {
    for shift in [0, 8, 23, 255] {
        let body = Body::Checksums {
            offset: 0,
            len: 512,
            region_shift: shift,
        };
        assert!(matches!(
            encode(&frame(body)),
            Err(WireError::BadCode { code, .. }) if code == shift
        ));
    }
    let ok = Body::Checksums {
        offset: 0,
        len: 4096,
        region_shift: 9,
    };
    let good = encode(&frame(ok)).unwrap();
    // A shift out of range on the wire.
    let mut b = good.clone();
    b[6] = 30;
    reseal(&mut b);
    assert!(matches!(
        decode(&b),
        Err(WireError::BadCode { code: 30, .. })
    ));
    // More than a payload's worth, or a range that overflows.
    let mut b = good.clone();
    b[32..36].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    reseal(&mut b);
    assert!(matches!(decode(&b), Err(WireError::TooLong { .. })));
    let mut b = good.clone();
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    reseal(&mut b);
    assert!(matches!(decode(&b), Err(WireError::Overflow { .. })));
    // Sums must be whole u32s.
    let sums = Body::Sums {
        offset: 0,
        region_shift: 9,
        sums: vec![1, 2],
    };
    let mut b = encode(&frame(sums)).unwrap();
    b[32..36].copy_from_slice(&7u32.to_le_bytes());
    reseal(&mut b);
    assert_eq!(decode(&b), Err(WireError::BadSums(7)));
    // Checksums carries no payload, so no data CRC.
    let mut b = good;
    b[36] = 1;
    reseal(&mut b);
    assert!(matches!(decode(&b), Err(WireError::NonZero { .. })));
}

#[test]
fn unused_fields_and_codes_must_be_zero() {
    let mut b = encode(&frame(Body::Flush)).unwrap();
    b[24] = 1;
    reseal(&mut b);
    assert_eq!(
        decode(&b),
        Err(WireError::NonZero {
            kind: Kind::Flush,
            field: "offset"
        })
    );
    let mut b = encode(&frame(Body::Ack { offset: 0, len: 0 })).unwrap();
    b[6] = 1;
    reseal(&mut b);
    assert!(matches!(
        decode(&b),
        Err(WireError::BadCode { code: 1, .. })
    ));
    let nack = Body::Nack {
        code: NackCode::Io,
        request_epoch: 1,
        message: "disk".into(),
    };
    let mut b = encode(&frame(nack)).unwrap();
    b[6] = 0;
    reseal(&mut b);
    assert!(matches!(
        decode(&b),
        Err(WireError::BadCode { code: 0, .. })
    ));
}

#[test]
fn a_nack_message_must_be_utf8() {
    let nack = Body::Nack {
        code: NackCode::Io,
        request_epoch: 1,
        message: "ab".into(),
    };
    let mut b = encode(&frame(nack)).unwrap();
    let n = b.len();
    b[n - 2..].copy_from_slice(&[0xff, 0xfe]);
    b[36..40].copy_from_slice(&crc32c(&[0xff, 0xfe]).to_le_bytes());
    reseal(&mut b);
    assert_eq!(decode(&b), Err(WireError::BadMessage));
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Frames encoded by an independent implementation of the layout in the
/// module docs (a few lines of Python), pinning the format byte for byte.
#[test]
fn golden_frames_from_the_documented_layout() {
    let write = unhex(concat!(
        "46425250010200050300000000000000020000000000000000100000000000001000",
        "0000eb08c9d95d52f26a766f6c2d31000102030405060708090a0b0c0d0e0f"
    ));
    let expected = Frame {
        volume: "vol-1".into(),
        epoch: 3,
        seq: 2,
        body: Body::Write {
            offset: 4096,
            data: (0..16).collect(),
        },
    };
    assert_eq!(decode(&write), Ok(Some((expected.clone(), write.len()))));
    assert_eq!(encode(&expected).unwrap(), write);
    let nack = unhex(concat!(
        "46425250010701050400000000000000060000000000000003000000000000000b00",
        "00000a73c0f292fca2e0766f6c2d3166656e6365643a20333c34"
    ));
    let expected = Frame {
        volume: "vol-1".into(),
        epoch: 4,
        seq: 6,
        body: Body::Nack {
            code: NackCode::Fenced,
            request_epoch: 3,
            message: "fenced: 3<4".into(),
        },
    };
    assert_eq!(decode(&nack), Ok(Some((expected.clone(), nack.len()))));
    assert_eq!(encode(&expected).unwrap(), nack);
}
