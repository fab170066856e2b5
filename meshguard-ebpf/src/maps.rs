//! Maps shared by every program. Sizes here are placeholders: the agent sets the real ones at
//! load time (`--flow-map-size`, `--ringbuf-bytes`).

use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
};
use meshguard_ebpf::{FlowState, Reported, SampleEvent, Stat};

/// Flow state by socket cookie. LRU so that a flood can never wedge the map; an eviction of a
/// flow that is still open shows up as `Stat::FlowEvicted` when it closes.
#[map(name = "FLOWS")]
pub static FLOWS: LruHashMap<u64, FlowState> = LruHashMap::with_max_entries(1024, 0);

/// Written by the agent only (no program touches it): the verdict it published for each flow
/// still open, so that an agent that restarts, or replaces these programs, knows what was
/// already reported, and on what evidence. Sized like `FLOWS` at load time.
#[map(name = "REPORTED")]
pub static REPORTED: LruHashMap<u64, Reported> = LruHashMap::with_max_entries(1024, 0);

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

/// Per CPU, the last socket whose sender is already recorded: a bulk sender calls sendmsg again
/// and again on one socket, and this spares each call the flow map lookup.
#[map(name = "SENDER_SEEN")]
pub static SENDER_SEEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU, the `Sample` event being built: too large for the stack, and written to the ring
/// buffer with only the bytes it carries.
#[map(name = "SAMPLE_SCRATCH")]
pub static SAMPLE_SCRATCH: PerCpuArray<SampleEvent> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: a per-CPU slot, written only from this CPU with preemption disabled.
        unsafe { *slot += 1 };
    }
}
