//! Ring-buffer records come from the kernel, but a mismatched or corrupted one must be refused,
//! never misread or a crash: what is decoded, written back in the kernel's layout, gives the
//! very bytes it came from.
#![no_main]

use std::mem::{offset_of, size_of};

use libfuzzer_sys::fuzz_target;
use meshguard::event::{decode, KernelEvent};
use meshguard_ebpf::{
    EventHeader, EventKind, FlowEvent, SampleEvent, DIRECTION_EGRESS, DIRECTION_INGRESS,
    LAYOUT_VERSION, SAMPLE_HEADER_LEN, SAMPLE_MAX,
};

fuzz_target!(|data: &[u8]| {
    let Ok(event) = decode(data) else {
        return;
    };
    let encoded = encode(&event, data);
    assert_eq!(
        encoded,
        data[..encoded.len()],
        "{event:?} is not what the bytes say"
    );
});

/// `event` in the kernel's layout; the padding, which says nothing, copied from `data`.
fn encode(event: &KernelEvent, data: &[u8]) -> Vec<u8> {
    let pad = |at: usize| u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
    let header = EventHeader {
        kind: event.kind as u16,
        version: LAYOUT_VERSION,
        _pad: pad(offset_of!(EventHeader, _pad)),
        cookie: event.cookie,
        ktime_ns: event.ktime_ns,
    };
    let Some(sample) = &event.sample else {
        assert_ne!(event.kind, EventKind::Sample, "a sample without its bytes");
        return bytes_of(&FlowEvent {
            header,
            flow: event.flow,
        });
    };
    assert_eq!(event.kind, EventKind::Sample);
    assert!(
        [DIRECTION_EGRESS, DIRECTION_INGRESS].contains(&sample.direction),
        "direction {}",
        sample.direction
    );
    let len = sample.bytes.len();
    assert!(len <= SAMPLE_MAX);
    let mut e = SampleEvent {
        header,
        flow: event.flow,
        direction: u32::from(sample.direction),
        len: len as u32,
        offset: sample.offset,
        _pad: pad(offset_of!(SampleEvent, _pad)),
        data: [0; SAMPLE_MAX],
    };
    e.data[..len].copy_from_slice(&sample.bytes);
    let mut bytes = bytes_of(&e);
    bytes.truncate(SAMPLE_HEADER_LEN + len);
    bytes
}

fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: reading the bytes of a padding-free `repr(C)` value of `meshguard_ebpf`.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}
