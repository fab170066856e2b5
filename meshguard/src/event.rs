//! Decoding of ring-buffer events. The kernel writes `#[repr(C)]` structs from
//! `meshguard_ebpf`; this is the one place that turns those bytes back into values, and it
//! rejects anything of the wrong size, kind or layout version instead of misreading it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use meshguard_ebpf::{
    EventHeader, EventKind, FlowEvent, FlowState, SampleEvent, DIRECTION_EGRESS, DIRECTION_INGRESS,
    LAYOUT_VERSION, SAMPLE_HEADER_LEN, SAMPLE_MAX,
};

/// A decoded kernel event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelEvent {
    pub kind: EventKind,
    pub cookie: u64,
    pub ktime_ns: u64,
    /// The flow's state when the event was written: every event carries it, so a flow can be
    /// picked up from whichever of its events arrives first.
    pub flow: FlowState,
    pub sample: Option<Sample>,
}

/// Payload bytes of one direction of a flow, from `offset` in its stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// `DIRECTION_EGRESS` or `DIRECTION_INGRESS`.
    pub direction: u8,
    pub offset: u32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("event has layout version {found}, this agent reads version {LAYOUT_VERSION}")]
    Version { found: u16 },
    #[error("unknown event kind {0}")]
    Kind(u16),
    #[error("{kind:?} event of {len} bytes, expected {expected}")]
    Size {
        kind: EventKind,
        len: usize,
        expected: usize,
    },
    #[error("sample claims {claimed} bytes, {present} are present (at most {SAMPLE_MAX})")]
    SampleLength { claimed: u32, present: usize },
    #[error("sample of direction {0}, neither egress nor ingress")]
    Direction(u32),
}

/// Reads a `T` from the front of `bytes`, which must be at least `size_of::<T>()` long.
fn read<T: Copy>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: the length is checked above; `T` is one of the padding-free `repr(C)` types of
    // `meshguard_ebpf`, valid for any bit pattern; `read_unaligned` needs no alignment.
    unsafe { bytes.as_ptr().cast::<T>().read_unaligned() }
}

pub fn decode(bytes: &[u8]) -> Result<KernelEvent, DecodeError> {
    if bytes.len() < size_of::<EventHeader>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    let header: EventHeader = read(bytes);
    if header.version != LAYOUT_VERSION {
        return Err(DecodeError::Version {
            found: header.version,
        });
    }
    let kind = EventKind::from_u16(header.kind).ok_or(DecodeError::Kind(header.kind))?;
    // A sample carries only the bytes it sampled; its header says how many.
    let expected = match kind {
        EventKind::Sample => SAMPLE_HEADER_LEN,
        _ => size_of::<FlowEvent>(),
    };
    // The ring buffer rounds records up to 8 bytes, so a record may be longer than its type.
    if bytes.len() < expected {
        return Err(DecodeError::Size {
            kind,
            len: bytes.len(),
            expected,
        });
    }
    let (flow, sample) = if kind == EventKind::Sample {
        // Field by field: copying the whole event (over a kilobyte) for a few payload bytes
        // would be most of the decoder's work.
        use std::mem::offset_of;
        let len: u32 = read(&bytes[offset_of!(SampleEvent, len)..]);
        let present = bytes.len() - SAMPLE_HEADER_LEN;
        if len as usize > SAMPLE_MAX || len as usize > present {
            return Err(DecodeError::SampleLength {
                claimed: len,
                present,
            });
        }
        let direction: u32 = read(&bytes[offset_of!(SampleEvent, direction)..]);
        // Anything else would be taken for one of them: a corrupted record.
        let direction = u8::try_from(direction)
            .ok()
            .filter(|d| [DIRECTION_EGRESS, DIRECTION_INGRESS].contains(d))
            .ok_or(DecodeError::Direction(direction))?;
        let offset: u32 = read(&bytes[offset_of!(SampleEvent, offset)..]);
        let sample = Sample {
            direction,
            offset,
            bytes: bytes[SAMPLE_HEADER_LEN..SAMPLE_HEADER_LEN + len as usize].to_vec(),
        };
        (read(&bytes[offset_of!(SampleEvent, flow)..]), Some(sample))
    } else {
        (read::<FlowEvent>(bytes).flow, None)
    };
    Ok(KernelEvent {
        kind,
        cookie: header.cookie,
        ktime_ns: header.ktime_ns,
        flow,
        sample,
    })
}

/// An address as the kernel stores it (network-order words, IPv4 in word 0).
pub fn ip_addr(family: u16, words: [u32; 4]) -> IpAddr {
    const AF_INET6: u16 = 10;
    if family == AF_INET6 {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(octets))
    } else {
        IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use meshguard_ebpf::FlowTuple;

    use super::*;

    pub(crate) fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a padding-free `repr(C)` value.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    pub(crate) fn flow_event(kind: EventKind, cookie: u64, flow: FlowState) -> Vec<u8> {
        bytes_of(&FlowEvent {
            header: EventHeader {
                kind: kind as u16,
                version: LAYOUT_VERSION,
                _pad: 0,
                cookie,
                ktime_ns: 7,
            },
            flow,
        })
    }

    pub(crate) fn sample_event(
        cookie: u64,
        flow: FlowState,
        direction: u8,
        data: &[u8],
    ) -> Vec<u8> {
        sample_at(cookie, flow, direction, 0, data)
    }

    /// A sample as the kernel writes it: the header and only the bytes sampled.
    pub(crate) fn sample_at(
        cookie: u64,
        flow: FlowState,
        direction: u8,
        offset: u32,
        data: &[u8],
    ) -> Vec<u8> {
        let mut event = SampleEvent {
            header: EventHeader {
                kind: EventKind::Sample as u16,
                version: LAYOUT_VERSION,
                _pad: 0,
                cookie,
                ktime_ns: 9,
            },
            flow,
            direction: direction as u32,
            len: data.len() as u32,
            offset,
            _pad: 0,
            data: [0; SAMPLE_MAX],
        };
        event.data[..data.len()].copy_from_slice(data);
        let mut bytes = bytes_of(&event);
        bytes.truncate(SAMPLE_HEADER_LEN + data.len());
        bytes
    }

    fn ipv4_flow() -> FlowState {
        FlowState {
            tuple: FlowTuple {
                local_addr: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
                remote_addr: [u32::from_ne_bytes([10, 0, 0, 2]), 0, 0, 0],
                local_port: 40000,
                remote_port: 80,
                family: 2,
                protocol: 6,
                direction: DIRECTION_EGRESS,
            },
            ..FlowState::default()
        }
    }

    #[test]
    fn decodes_each_kind() {
        let flow = ipv4_flow();
        for kind in [EventKind::Open, EventKind::Process, EventKind::Close] {
            let event = decode(&flow_event(kind, 42, flow)).unwrap();
            assert_eq!((event.kind, event.cookie, event.flow), (kind, 42, flow));
            assert_eq!(event.sample, None);
        }
        let event = decode(&sample_event(
            5,
            flow,
            DIRECTION_EGRESS,
            b"GET / HTTP/1.1\r\n",
        ))
        .unwrap();
        assert_eq!(event.kind, EventKind::Sample);
        let sample = event.sample.unwrap();
        assert_eq!(sample.bytes, b"GET / HTTP/1.1\r\n");
        assert_eq!((sample.direction, sample.offset), (DIRECTION_EGRESS, 0));
        let later = decode(&sample_at(5, flow, DIRECTION_EGRESS, 1448, b"rest")).unwrap();
        assert_eq!(later.sample.unwrap().offset, 1448);
    }

    #[test]
    fn rejects_malformed_events() {
        let flow = ipv4_flow();
        let good = flow_event(EventKind::Open, 1, flow);

        let mut wrong_version = good.clone();
        wrong_version[2] = 99;
        let mut wrong_kind = good.clone();
        wrong_kind[0] = 77;
        let len_at = std::mem::offset_of!(SampleEvent, len);
        let mut long_sample = sample_event(1, flow, 1, b"x");
        long_sample[len_at..len_at + 4].copy_from_slice(&(SAMPLE_MAX as u32 + 1).to_ne_bytes());
        let mut cut_sample = sample_event(1, flow, 1, b"abcd");
        cut_sample.truncate(cut_sample.len() - 1);
        // Read as a u8, 0x101 would pass for egress.
        let direction_at = std::mem::offset_of!(SampleEvent, direction);
        let [no_way, third_way, wide_way] = [0u32, 3, 0x101].map(|d| {
            let mut e = sample_event(1, flow, 1, b"x");
            e[direction_at..direction_at + 4].copy_from_slice(&d.to_ne_bytes());
            e
        });

        let cases: [(&[u8], DecodeError); 10] = [
            (&[], DecodeError::Short(0)),
            (&good[..10], DecodeError::Short(10)),
            (&wrong_version, DecodeError::Version { found: 99 }),
            (&wrong_kind, DecodeError::Kind(77)),
            (
                &good[..100],
                DecodeError::Size {
                    kind: EventKind::Open,
                    len: 100,
                    expected: size_of::<FlowEvent>(),
                },
            ),
            (
                &long_sample,
                DecodeError::SampleLength {
                    claimed: SAMPLE_MAX as u32 + 1,
                    present: 1,
                },
            ),
            (
                &cut_sample,
                DecodeError::SampleLength {
                    claimed: 4,
                    present: 3,
                },
            ),
            (&no_way, DecodeError::Direction(0)),
            (&third_way, DecodeError::Direction(3)),
            (&wide_way, DecodeError::Direction(0x101)),
        ];
        for (bytes, want) in cases {
            assert_eq!(decode(bytes), Err(want));
        }
    }

    /// Writes the event decoder's fuzz seeds: one event of each kind in the current layout.
    /// Run after a layout change: `cargo test -p meshguard write_event_seeds -- --ignored`.
    #[test]
    #[ignore = "writes the committed fuzz corpus"]
    fn write_event_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/event_decode");
        std::fs::create_dir_all(&dir).unwrap();
        let flow = ipv4_flow();
        let seeds = [
            ("open", flow_event(EventKind::Open, 1, flow)),
            ("process", flow_event(EventKind::Process, 1, flow)),
            ("close", flow_event(EventKind::Close, 1, flow)),
            (
                "sample-http",
                sample_event(
                    1,
                    flow,
                    DIRECTION_EGRESS,
                    b"GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n",
                ),
            ),
            (
                "sample-tls",
                sample_event(1, flow, DIRECTION_EGRESS, &[22, 3, 1, 0, 5, 1, 0, 0, 1, 3]),
            ),
            (
                "sample-continued",
                sample_at(1, flow, DIRECTION_EGRESS, 1448, &[0x11, 0xec, 4, 0xc0]),
            ),
        ];
        for (name, bytes) in seeds {
            std::fs::write(dir.join(format!("v{LAYOUT_VERSION}-{name}")), bytes).unwrap();
        }
    }

    #[test]
    fn addresses_in_kernel_byte_order() {
        let v4 = [u32::from_ne_bytes([192, 0, 2, 7]), 0, 0, 0];
        assert_eq!(ip_addr(2, v4).to_string(), "192.0.2.7");
        let v6: Ipv6Addr = "fd00:1::2".parse().unwrap();
        let o = v6.octets();
        let words = [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]));
        assert_eq!(ip_addr(10, words).to_string(), "fd00:1::2");
    }
}
