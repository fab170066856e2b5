//! Maps shared by every program. Sizes here are placeholders: the agent sets the real ones at
//! load time (`--flow-map-size`, `--ringbuf-bytes`).

use core::ptr::addr_of;

/// Required of an LPM trie: entries are allocated as they are inserted.
const BPF_F_NO_PREALLOC: u32 = 1;

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    btf_maps::SkStorage,
    helpers::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use meshguard_ebpf::{AllowKey, Enforce, FlowCounters, FlowState, Reported, SampleEvent, Stat};

/// Flow state by socket cookie. LRU so that a flood can never wedge the map; an eviction of a
/// flow that is still open shows up as `Stat::FlowEvicted` when it closes.
#[map(name = "FLOWS")]
pub static FLOWS: LruHashMap<u64, FlowState> = LruHashMap::with_max_entries(1024, 0);

/// Written by the agent only (no program touches it): the verdict it published for each flow
/// still open, so that an agent that restarts, or replaces these programs, knows what was
/// already reported, and on what evidence. Sized like `FLOWS` at load time.
#[map(name = "REPORTED")]
pub static REPORTED: LruHashMap<u64, Reported> = LruHashMap::with_max_entries(1024, 0);

/// Per socket, what its flow has already given, so that a program can return at once instead
/// of looking the flow up. `cgroup_skb` marks a direction of a TCP flow *quiet* once its
/// evidence is all in the flow map and the flow has lasted a few packets (see `skb.rs`): its
/// packets are then counted here. The sender is marked by `process.rs` for a socket that sends
/// again once it is recorded. A short connection never pays for the storage. Socket-local
/// storage goes with its socket; the agent never reads it.
#[btf_map]
pub static QUIET: SkStorage<Quiet> = SkStorage::new();

/// Indexed by direction: 0 egress, 1 ingress.
#[repr(C)]
pub struct Quiet {
    /// The flow map's payload bytes and packets of a direction when it went quiet.
    pub base_bytes: [u64; 2],
    pub base_packets: [u64; 2],
    /// Counted here since: the flow's count is the base plus these.
    pub bytes: [u64; 2],
    pub packets: [u64; 2],
    /// Packets of each quiet direction, for `skb::REFRESH_EVERY`.
    pub runs: [u32; 2],
    /// What is taken: `flags::SAMPLED_*`, the quiet directions; `flags::PROCESS`, the sender
    /// is recorded. Written without atomics: a bit lost to a race only sends a later packet or
    /// send down the full path, which sets it again.
    pub taken: u32,
    pub _pad: u32,
}

impl Quiet {
    /// Writes quiet direction `d`'s counts into its flow's counters.
    #[inline(always)]
    pub fn write_counts(&self, d: usize, c: &mut FlowCounters) {
        let bytes = self.base_bytes[d].wrapping_add(self.bytes[d]);
        let packets = self.base_packets[d].wrapping_add(self.packets[d]);
        if d == 0 {
            c.bytes_sent = bytes;
            c.packets_sent = packets;
        } else {
            c.bytes_received = bytes;
            c.packets_received = packets;
        }
    }
}

/// A socket's `Quiet` storage, made (zeroed) when `create`; null when it has none, `sk` is null
/// or not a full socket, or it cannot be made (the socket then stays on the full path, which
/// is only slower).
#[inline(always)]
pub fn quiet_of<T>(sk: *mut T, create: bool) -> *mut Quiet {
    if sk.is_null() {
        return core::ptr::null_mut();
    }
    // Made zeroed (no initial value).
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: `sk` is a socket pointer of the calling program's context (the helper returns
    // null for one that is not a full socket); `QUIET` is a socket storage map of `Quiet`.
    unsafe {
        bpf_sk_storage_get(
            addr_of!(QUIET).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            flags,
        )
        .cast()
    }
}

/// Written by the agent: what is refused of each enforced container's sockets (see
/// [`Enforce`]). Empty: nothing is.
#[map(name = "ENFORCE")]
pub static ENFORCE: HashMap<u64, Enforce> = HashMap::with_max_entries(8192, 0);

/// Written by the agent: plaintext the verdict policy expects (see [`AllowKey`]).
#[map(name = "ALLOWED")]
pub static ALLOWED: LpmTrie<AllowKey, u8> = LpmTrie::with_max_entries(16384, BPF_F_NO_PREALLOC);

/// Written by the agent, `[0]`: until when (`bpf_ktime_get_ns`) it vouches for `ENFORCE`. It
/// renews it while it runs; an agent that stops or hangs lets it lapse, and then nothing is
/// refused (fail-open), unless it was told to keep it (`u64::MAX`).
#[map(name = "ENFORCE_UNTIL")]
pub static ENFORCE_UNTIL: Array<u64> = Array::with_max_entries(1, 0);

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
