//! Where events and flows are lost, named once: the kernel's counters and the agent's own
//! losses, as `meshguard_events_lost_total{source}`, the status's `events_lost` and `meshguard
//! status` name them.

use meshguard_ebpf::Stat;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LossSource {
    /// Kernel events dropped by a full ring buffer.
    RingbufFull,
    /// Flows the kernel's flow map refused.
    FlowMapFull,
    /// Open flows evicted from the kernel's flow map.
    FlowEvicted,
    /// Kernel events the agent could not read.
    Undecodable,
    /// Open flows dropped from the agent's table to make room.
    AgentTableEvicted,
    /// Flows evicted from the kernel's map before the agent saw any of their events.
    FlowEvictedUnseen,
}

impl LossSource {
    pub const ALL: [LossSource; 6] = [
        LossSource::RingbufFull,
        LossSource::FlowMapFull,
        LossSource::FlowEvicted,
        LossSource::Undecodable,
        LossSource::AgentTableEvicted,
        LossSource::FlowEvictedUnseen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LossSource::RingbufFull => "ringbuf_full",
            LossSource::FlowMapFull => "flow_map_full",
            LossSource::FlowEvicted => "flow_evicted",
            LossSource::Undecodable => "undecodable",
            LossSource::AgentTableEvicted => "agent_table_evicted",
            LossSource::FlowEvictedUnseen => "flow_evicted_unseen",
        }
    }

    /// The loss a kernel counter counts; `None` for counters of what is not a loss.
    pub fn of_stat(stat: Stat) -> Option<Self> {
        match stat {
            Stat::RingbufFull => Some(LossSource::RingbufFull),
            Stat::FlowMapFull => Some(LossSource::FlowMapFull),
            Stat::FlowEvicted => Some(LossSource::FlowEvicted),
            Stat::FlowMidstream | Stat::PacketUnreadable => None,
        }
    }

    /// `n` of them as a person on call reads it: what was lost, what it costs.
    pub fn in_words(self, n: u64) -> String {
        match self {
            LossSource::RingbufFull => format!(
                "{n} kernel events dropped by a full ring buffer (their flows are recovered from the flow map; raise --ringbuf-bytes if this grows)"
            ),
            LossSource::FlowMapFull => {
                format!("{n} flows not tracked: the kernel's flow map refused them")
            }
            LossSource::FlowEvicted => format!(
                "{n} flows evicted from the kernel's flow map while open: their byte counts stop early (raise --flow-map-size)"
            ),
            LossSource::FlowEvictedUnseen => format!(
                "{n} flows evicted before the agent saw them: only their addresses are known, no verdict"
            ),
            LossSource::Undecodable => format!(
                "{n} kernel events unreadable (an agent and programs of different versions?)"
            ),
            LossSource::AgentTableEvicted => format!(
                "{n} open flows dropped from the agent's table to make room (raise --max-flows)"
            ),
        }
    }
}

impl std::str::FromStr for LossSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        LossSource::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a loss source"))
    }
}

impl std::fmt::Display for LossSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_reads_back_and_every_kernel_loss_has_one() {
        for source in LossSource::ALL {
            assert_eq!(source.as_str().parse(), Ok(source));
            assert!(source.in_words(3).starts_with("3 "), "{source}");
        }
        let kernel: Vec<_> = Stat::ALL
            .into_iter()
            .filter_map(LossSource::of_stat)
            .collect();
        assert_eq!(
            kernel,
            [
                LossSource::RingbufFull,
                LossSource::FlowMapFull,
                LossSource::FlowEvicted
            ]
        );
        assert!("flow_lost".parse::<LossSource>().is_err());
    }
}
